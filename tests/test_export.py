"""Export (spec 5.6) through a real server: to Azurite in Azure's body shape (connection string and SAS URI), to S3 on
SeaweedFS and to an allow-listed folder; every file byte for byte, the error log, Azure's 400s, de-identification,
and a task cut short by a dead worker that another worker redoes."""

from __future__ import annotations

import io
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import obstore
import pydicom
import pytest

from dicomhub.blobs.base import Staged
from dicomhub.blobs.object_store import s3_store
from dicomhub.config import DEFAULT_PARTITION, Settings
from dicomhub.domain.export import parse_export_request, start_export
from dicomhub.domain.operations import OperationStatus, OperationType
from dicomhub.services import build_services
from tests.conftest import ENGINES
from tests.factory import make_dataset, make_instance, new_uid, to_bytes
from tests.servers import Server, database_url
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY
from tests.support.object_stores import azurite, seaweedfs
from tests.test_bulk_update import store, wait

DICOM = {"Accept": "application/dicom; transfer-syntax=*"}


@pytest.fixture(scope="module", params=ENGINES)
def export_server(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"export-{request.param}")
    roots = tmp_path_factory.mktemp("export-roots")
    srv = Server(data_dir, database_url(request.param), export_roots=str(roots), operation_poll_seconds="0.05")
    srv.blob_env = {**srv.blob_env, **seaweedfs().env(), **azurite().env()}
    srv.roots = roots
    yield srv.start()
    srv.stop()


@pytest.fixture
def client(export_server):
    import httpx

    with httpx.Client(base_url=export_server.url, timeout=60) as c:
        yield c


def _study(series_count: int = 2, per_series: int = 2, **attributes) -> tuple[str, list[bytes]]:
    study = new_uid()
    files = []
    for _ in range(series_count):
        series = new_uid()
        files += [make_instance(study=study, series=series, **attributes) for _ in range(per_series)]
    return study, files


def _uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _export(client, body: dict) -> dict:
    response = client.post("/v2/export", json=body)
    assert response.status_code == 202, response.text
    reference = response.json()
    assert len(reference["id"]) == 32 and reference["id"] == reference["id"].lower()
    assert response.headers["Location"] == reference["href"]
    done = wait(client, reference["id"])
    assert done["type"] == "export" and done["status"] == "succeeded", done
    return done


def _identifiers(values: list[str]) -> dict:
    return {"type": "identifiers", "settings": {"values": values}}


def _to(kind: str, settings: dict, **extra) -> dict:
    return {"source": _identifiers(["1.2"]), "destination": {"type": kind, "settings": settings}, **extra}


def _container():
    return azurite().service().get_container_client("exports")


def test_export_to_azure_blob_in_azures_shape(client):
    study, files = _study()
    other_study, other_files = _study(series_count=1, per_series=2)
    store(client, files + other_files)
    s2, series2, sop2 = _uids(other_files[0])
    unknown = [new_uid(), f"{study}/{new_uid()}", f"{study}/{_uids(files[0])[1]}/{new_uid()}"]
    body = {
        "source": _identifiers([study, f"{s2}/{series2}", f"{s2}/{series2}/{sop2}", *unknown]),
        "destination": {
            "type": "azureblob",
            "settings": {"connectionString": azurite().connection_string, "blobContainerName": "exports"},
        },
    }
    done = _export(client, body)
    op = done["operationId"]
    assert done["results"]["exported"] == 6 and done["results"]["skipped"] == 3
    assert done["results"]["errorHref"] == f"{azurite().endpoint}/exports/{op}/errors.log"
    container = _container()
    names = sorted(b.name for b in container.list_blobs(name_starts_with=f"{op}/"))
    expected = sorted(f"{op}/results/{'/'.join(_uids(f))}.dcm" for f in files + other_files)
    assert names == sorted([*expected, f"{op}/errors.log"])
    for data in files + other_files:
        exported = container.download_blob(f"{op}/results/{'/'.join(_uids(data))}.dcm").readall()
        assert exported == data
    lines = [json.loads(line) for line in container.download_blob(f"{op}/errors.log").readall().splitlines()]
    assert sorted(line["identifier"] for line in lines) == sorted(unknown)
    assert all(set(line) == {"timestamp", "identifier", "error"} and "not found" in line["error"] for line in lines)


def test_export_through_a_container_sas_uri(client):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    study, files = _study(series_count=1, per_series=1)
    store(client, files)
    sas = generate_container_sas(
        ACCOUNT, "exports", account_key=ACCOUNT_KEY, expiry=datetime.now(UTC) + timedelta(hours=1),
        permission=ContainerSasPermissions(read=True, write=True, list=True, create=True),
    )  # fmt: skip
    uri = f"{azurite().endpoint}/exports?{sas}"
    done = _export(
        client,
        {"source": _identifiers([study]), "destination": {"type": "azureblob", "settings": {"blobContainerUri": uri}}},
    )
    assert "sig=" not in done["results"]["errorHref"]
    key = f"{done['operationId']}/results/{'/'.join(_uids(files[0]))}.dcm"
    assert _container().download_blob(key).readall() == files[0]


def test_export_to_s3_and_to_a_folder(client, export_server):
    study, files = _study(series_count=1, per_series=2)
    store(client, files)
    done = _export(
        client,
        {
            "source": _identifiers([study]),
            "destination": {"type": "s3", "settings": {"bucket": "exports", "prefix": "runs/a"}},
        },
    )
    op = done["operationId"]
    assert done["results"] == {"exported": 2, "skipped": 0, "errorHref": f"s3://exports/runs/a/{op}/errors.log"}
    bucket = s3_store("exports", "runs/a", allow_http=False, env=seaweedfs().env())
    for data in files:
        assert bytes(obstore.get(bucket, f"{op}/results/{'/'.join(_uids(data))}.dcm").bytes()) == data
    assert bytes(obstore.get(bucket, f"{op}/errors.log").bytes()) == b""
    folder = export_server.roots / "out"
    done = _export(
        client,
        {"source": _identifiers([study]), "destination": {"type": "filesystem", "settings": {"path": str(folder)}}},
    )
    for data in files:
        study_uid, series_uid, sop_uid = _uids(data)
        exported = folder / done["operationId"] / "results" / study_uid / series_uid / f"{sop_uid}.dcm"
        assert exported.read_bytes() == data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"destination": {}}, "Missing value for property 'Source'."),
        ({"source": {"type": "identifiers", "settings": {}}}, "Missing value for property 'Values'."),
        ({"source": {"type": "query", "settings": {"values": ["1.2"]}}}, "export source type 'query' is not supported"),
        ({"source": _identifiers(["1.2/x"])}, "The export identifier '1.2/x' is invalid"),
        (_to("ftp", {}), "type 'ftp' is not supported"),
        (_to("azureblob", {}), "Specify either"),
        (_to("s3", {"bucket": "nobucket"}), "NoSuchBucket"),
        (_to("filesystem", {"path": "/etc"}), "outside the folders"),
        (_to("s3", {"bucket": "exports"}, deidentify={"profile": "x"}), "profile 'x' is not supported"),
    ],
)  # fmt: skip
def test_bad_export_requests_are_400_with_a_message(client, body, message):
    response = client.post("/v2/export", json=body)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_missing_container_and_escaping_path_are_400(client, export_server):
    settings = {"connectionString": azurite().connection_string, "blobContainerName": "nosuchcontainer"}
    response = client.post(
        "/v2/export", json={"source": _identifiers(["1.2"]), "destination": {"type": "azureblob", "settings": settings}}
    )
    assert response.status_code == 400 and "ContainerNotFound" in response.text, response.text
    escaping = str(export_server.roots / ".." / "elsewhere")
    response = client.post(
        "/v2/export",
        json={"source": _identifiers(["1.2"]), "destination": {"type": "filesystem", "settings": {"path": escaping}}},
    )
    assert response.status_code == 400 and "'..'" in response.text, response.text


def test_deidentified_export(client, export_server):
    study, series = new_uid(), new_uid()
    identifying = dict(
        PatientName="Doe^Jane^Secret", PatientID="PID-8842-XYZ", PatientBirthDate="19510417", StudyDate="20240102",
        InstitutionName="St Elsewhere Clinic", ReferringPhysicianName="Quack^Doctor", AccessionNumber="ACC99731",
    )  # fmt: skip
    datasets = [make_dataset(study=study, series=series, **identifying) for _ in range(2)]
    files = [to_bytes(ds) for ds in datasets]
    store(client, files)
    folder = export_server.roots / "deid"
    body = {
        "source": _identifiers([study]),
        "destination": {"type": "filesystem", "settings": {"path": str(folder)}},
        "deidentify": {"profile": "basic"},
    }
    done = _export(client, body)
    exported = sorted((folder / done["operationId"] / "results").rglob("*.dcm"))
    assert len(exported) == 2
    originals = {ds.SOPInstanceUID: ds for ds in datasets}
    new_studies = set()
    for path in exported:
        data = path.read_bytes()
        for value in [*identifying.values(), study, series, *originals]:
            assert value.encode() not in data, f"{value} is in {path.name}"
        out = pydicom.dcmread(io.BytesIO(data))
        new_studies.add(out.StudyInstanceUID)
        assert path.relative_to(folder / done["operationId"] / "results").parts == (
            out.StudyInstanceUID, out.SeriesInstanceUID, f"{out.SOPInstanceUID}.dcm"
        )  # fmt: skip
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.PatientIdentityRemoved == "YES" and "PS3.15" in out.DeidentificationMethod
        assert out.get("PatientBirthDate", "") == "" and out.get("StudyDate", "") == ""
        assert out.PixelData == datasets[0].PixelData
    assert len(new_studies) == 1  # one original study UID -> one new UID within the export


class Died(BaseException):
    """Ends a worker the way a kill would: no handler sees it, the lease stays taken."""


def test_a_dead_workers_export_task_is_redone_identically(tmp_path, monkeypatch):
    """A worker wrote one file of its task and died: another worker takes the task over once the lease ends and
    redoes it; every file is there once with the same bytes, and the counts are those of one run."""
    for key, value in seaweedfs().env().items():
        monkeypatch.setenv(key, value)
    settings = Settings(data_dir=tmp_path, operation_lease_seconds=0.3, operation_poll_seconds=0.02)
    services = build_services(settings)
    partition = services.index.ensure_partition(DEFAULT_PARTITION)
    study, files = _study(series_count=1, per_series=3)
    results = services.store.store_many(partition, [Staged(data=bytearray(f)) for f in files], 2, None)
    assert all(r.stored for r in results)
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    body = {
        "source": _identifiers([study]),
        "destination": {"type": "s3", "settings": {"bucket": "exports", "prefix": prefix}},
    }
    operation = start_export(services.operations, partition, parse_export_request(body, settings))
    handler = next(h for h in services.operation_handlers if h.type == OperationType.EXPORT)
    original = handler._export

    def die_after_first(*args):
        original(*args)
        raise Died

    monkeypatch.setattr(handler, "_export", die_after_first)
    dead = services.operation_worker()
    dead.run_once()  # plans
    with pytest.raises(Died):
        dead.run_once()
    monkeypatch.setattr(handler, "_export", original)
    worker = services.operation_worker()
    deadline = time.monotonic() + 30
    while not services.operations.get(operation.id).finished and time.monotonic() < deadline:
        worker.run_once() or time.sleep(0.05)
    done = services.operations.get(operation.id)
    assert done.status == OperationStatus.SUCCEEDED and done.results["exported"] == 3, done
    bucket = s3_store("exports", prefix, allow_http=False, env=seaweedfs().env())
    names = sorted(m["path"] for page in obstore.list(bucket) for m in page)
    op_id = operation.id
    assert names == sorted([f"{op_id}/errors.log", *(f"{op_id}/results/{'/'.join(_uids(f))}.dcm" for f in files)])
    for data in files:
        assert bytes(obstore.get(bucket, f"{op_id}/results/{'/'.join(_uids(data))}.dcm").bytes()) == data
    services.index.engine.dispose()
