"""Server-side import and `dicomhub import` from object stores: a prefix of good, broken and duplicate files through
the store path, counts and reasons, 400s, and a crash that resumes without storing anything twice."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import obstore
import pytest

from dicomhub.blobs.object_store import azure_store, s3_store
from dicomhub.config import DEFAULT_PARTITION, Settings
from dicomhub.domain.import_ import parse_import_request, start_import
from dicomhub.domain.operations import OperationStatus, OperationType
from dicomhub.services import build_services
from tests.conftest import ENGINES
from tests.factory import make_instance, new_uid
from tests.servers import Server, database_url
from tests.support.object_stores import azurite, seaweedfs
from tests.test_bulk_update import store, wait


@pytest.fixture(scope="module", params=ENGINES)
def import_server(request, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp(f"import-{request.param}"), database_url(request.param))
    srv.blob_env = {**srv.blob_env, **seaweedfs().env(), **azurite().env()}
    yield srv.start()
    srv.stop()


@pytest.fixture
def client(import_server):
    with httpx.Client(base_url=import_server.url, timeout=60) as c:
        yield c


def _fill(store, study: str) -> tuple[list[bytes], bytes]:
    """Puts 3 good files, a broken one, a text file and (returned apart) a file the archive already holds."""
    good = [make_instance(study=study) for _ in range(3)]
    duplicate = make_instance(study=study)
    for number, data in enumerate([*good, duplicate]):
        obstore.put(store, f"dicom/{number}.dcm", data)
    obstore.put(store, "dicom/broken.dcm", good[0][:300])
    obstore.put(store, "dicom/readme.txt", b"not a DICOM file")
    return good, duplicate


def _import(client, source: dict) -> dict:
    response = client.post("/v2/import", json={"source": source})
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == response.json()["href"]
    done = wait(client, response.json()["id"])
    assert done["type"] == "import" and done["status"] == "succeeded", done
    return done["results"]


def _check(client, results: dict, study: str, good: list[bytes], duplicate: bytes) -> None:
    assert (results["stored"], results["duplicates"], results["failed"]) == (3, 1, 2), results
    assert sorted(f["name"] for f in results["failures"]) == ["dicom/broken.dcm", "dicom/readme.txt"]
    assert all(f["reason"] for f in results["failures"])
    found = client.get(f"/v2/studies/{study}/instances").json()
    assert len(found) == 4  # the three good ones and the one that was there before


@pytest.mark.parametrize("kind", ["s3", "azureblob"])
def test_import_of_a_prefix(client, kind):
    prefix = f"in-{uuid.uuid4().hex[:8]}"
    study = new_uid()
    if kind == "s3":
        bucket = s3_store("imports", prefix, allow_http=False, env=seaweedfs().env())
        settings = {"bucket": "imports", "prefix": prefix}
    else:
        bucket = azure_store("imports", prefix, allow_http=False, env=azurite().env())
        settings = {"connectionString": azurite().connection_string, "blobContainerName": "imports", "prefix": prefix}
    good, duplicate = _fill(bucket, study)
    store(client, [duplicate])
    _check(client, _import(client, {"type": kind, "settings": settings}), study, good, duplicate)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (None, "Missing value for property 'Source'."),
        ({"type": "ftp", "settings": {}}, "source type 'ftp' is not supported"),
        ({"type": "s3", "settings": {"bucket": "nobucket"}}, "NoSuchBucket"),
        ({"type": "azureblob", "settings": {"connectionString": "AccountName=x", "blobContainerName": "c"}}, "neither"),
        ({"type": "filesystem", "settings": {"path": "/etc"}}, "DICOMHUB_EXPORT_ROOTS"),
    ],
)
def test_bad_import_requests_are_400(client, source, message):
    response = client.post("/v2/import", json={} if source is None else {"source": source})
    assert response.status_code == 400, response.text
    assert message in response.text


def test_a_crashed_import_resumes_without_storing_twice(tmp_path, monkeypatch):
    """A worker stores part of its batch and dies before recording the task; the task is redone: nothing is stored
    twice, the redone objects come back as duplicates, and the operation still succeeds."""
    for key, value in seaweedfs().env().items():
        monkeypatch.setenv(key, value)
    settings = Settings(data_dir=tmp_path, operation_lease_seconds=0.3, operation_poll_seconds=0.02)
    services = build_services(settings)
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    study = new_uid()
    good, duplicate = _fill(s3_store("imports", prefix, allow_http=False, env=seaweedfs().env()), study)
    partition = services.index.ensure_partition(DEFAULT_PARTITION)
    source = {"source": {"type": "s3", "settings": {"bucket": "imports", "prefix": prefix}}}
    operation = start_import(services.operations, partition, parse_import_request(source, settings))
    handler = next(h for h in services.operation_handlers if h.type == OperationType.IMPORT)
    real_store_many = handler.store.store_many

    class Died(BaseException):
        pass

    def store_then_die(*args):
        real_store_many(*args)
        raise Died

    monkeypatch.setattr(handler.store, "store_many", store_then_die)
    dead = services.operation_worker()
    dead.run_once()  # plans
    with pytest.raises(Died):
        dead.run_once()
    monkeypatch.setattr(handler.store, "store_many", real_store_many)
    worker = services.operation_worker()
    deadline = time.monotonic() + 30
    while not services.operations.get(operation.id).finished and time.monotonic() < deadline:
        worker.run_once() or time.sleep(0.05)
    done = services.operations.get(operation.id)
    assert done.status == OperationStatus.SUCCEEDED, done
    assert done.results["stored"] + done.results["duplicates"] == 4 and done.results["failed"] == 2, done.results
    instances = services.index.find_instances(partition.key, study)
    assert len(instances) == 4 and len({i.sop_uid for i in instances}) == 4
    services.index.engine.dispose()


def test_cli_import_reads_s3_and_azure_prefixes(tmp_path):
    env = {**seaweedfs().env(), **azurite().env(), "DICOMHUB_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    study = new_uid()
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    _fill(s3_store("imports", prefix, allow_http=False, env=seaweedfs().env()), study)
    other = make_instance(study=study)
    obstore.put(azure_store("imports", prefix, allow_http=False, env=azurite().env()), "x/one.dcm", other)
    result = subprocess.run(
        [sys.executable, "-m", "dicomhub", "import", f"s3://imports/{prefix}", f"azure://imports/{prefix}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "imported: 5 stored (0 with warnings), 0 duplicates, 2 failed" in " ".join(result.stderr.split())
    assert "dicom/broken.dcm" in result.stderr
