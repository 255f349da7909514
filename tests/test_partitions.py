"""End-to-end data partitions: off by default; when on, every Studies route under /v{n}/partitions/{name}/, the
default partition, implicit creation on STOW, GET /v{n}/partitions, name rules, and no data crossing partitions.

Partition names are fresh per test (the partitioned server is shared by the session).
"""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from tests.factory import make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server

DICOM_JSON = {"Accept": "application/dicom+json"}
DEFAULT = "Microsoft.Default"
DISABLED = "Data partitions feature is disabled."
MISSING = "PartitionName value is missing in the route segment."
UNKNOWN = "Specified PartitionName does not exist."
INVALID = "The specified PartitionName is invalid."


def fresh_name(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def phttp(partitioned_server: Server):
    with httpx.Client(base_url=partitioned_server.url, timeout=60) as client:
        yield client


def store(client: httpx.Client, base: str, *datasets: Dataset, study: str | None = None) -> dict:
    content_type, body = multipart([to_bytes(ds) for ds in datasets])
    path = f"{base}/studies" + (f"/{study}" if study else "")
    response = client.post(path, content=body, headers={"Content-Type": content_type, **DICOM_JSON})
    assert response.status_code == 200, response.text
    return response.json()


def qido(client: httpx.Client, path: str, params=None) -> list[dict]:
    response = client.get(path, params=params, headers=DICOM_JSON)
    if response.status_code == 204:
        assert response.content == b""
        return []
    assert response.status_code == 200, response.text
    return response.json()


def first(item: dict, tag: str):
    value = item[tag]["Value"][0]
    return value["Alphabetic"] if item[tag]["vr"] == "PN" else value


def fetch_instance(client: httpx.Client, base: str, ds: Dataset) -> httpx.Response:
    path = f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    return client.get(path, headers={"Accept": "application/dicom; transfer-syntax=*"})


def expect_400(response: httpx.Response, message: str) -> None:
    assert (response.status_code, response.text) == (400, message), response.request.url


def partitions(client: httpx.Client, version: str = "v2") -> list[dict]:
    response = client.get(f"/{version}/partitions")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def created(entry: dict) -> datetime:
    when = datetime.fromisoformat(entry["createdDate"].replace("Z", "+00:00"))
    assert when.tzinfo is not None, entry
    return when


# -- listing and implicit creation -------------------------------------------------------------------------------
def test_list_contains_the_default_partition(phttp):
    for version in ("v1", "v2", "v1.0-prerelease"):
        listed = partitions(phttp, version)
        default = [p for p in listed if p["partitionName"] == DEFAULT]
        assert len(default) == 1
        assert default[0]["partitionKey"] == 1
        assert set(default[0]) == {"partitionKey", "partitionName", "createdDate"}
        assert created(default[0]) <= datetime.now(UTC)
    keys = [p["partitionKey"] for p in listed]
    assert len(keys) == len(set(keys))


def test_stow_creates_the_partition(partitioned_server, phttp):
    name = fresh_name("p1")
    base = f"/v2/partitions/{name}"
    expect_400(phttp.get(f"{base}/studies", headers=DICOM_JSON), UNKNOWN)
    assert name not in [p["partitionName"] for p in partitions(phttp)]
    before = datetime.now(UTC) - timedelta(seconds=5)

    ds = make_dataset()
    body = store(phttp, base, ds)
    url = body["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert url == (
        f"{partitioned_server.url}/v2/partitions/{name}/studies/{ds.StudyInstanceUID}"
        f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )
    # STOW to a study: the study-level RetrieveURL is inside the partition too
    same_study = make_dataset(study=ds.StudyInstanceUID)
    body = store(phttp, base, same_study, study=ds.StudyInstanceUID)
    assert body["00081190"]["Value"] == [f"{partitioned_server.url}/v2/partitions/{name}/studies/{ds.StudyInstanceUID}"]
    assert f"/partitions/{name}/studies/" in body["00081199"]["Value"][0]["00081190"]["Value"][0]

    entry = [p for p in partitions(phttp) if p["partitionName"] == name]
    assert len(entry) == 1 and entry[0]["partitionKey"] > 1
    assert before <= created(entry[0]) <= datetime.now(UTC) + timedelta(seconds=5)
    found = qido(phttp, f"{base}/studies", {"StudyInstanceUID": ds.StudyInstanceUID})
    assert [first(r, "0020000D") for r in found] == [ds.StudyInstanceUID]
    # the RetrieveURL works as given
    response = httpx.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert response.status_code == 200
    assert pydicom.dcmread(io.BytesIO(response.content)).SOPInstanceUID == ds.SOPInstanceUID


def test_concurrent_first_stores_create_one_partition(phttp):
    name = fresh_name("race")
    datasets = [make_dataset() for _ in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        bodies = list(pool.map(lambda ds: store(phttp, f"/v2/partitions/{name}", ds), datasets))
    assert len(bodies) == 6
    assert [p["partitionName"] for p in partitions(phttp)].count(name) == 1
    found = qido(phttp, f"/v2/partitions/{name}/instances")
    assert sorted(first(r, "00080018") for r in found) == sorted(ds.SOPInstanceUID for ds in datasets)


# -- isolation --------------------------------------------------------------------------------------------------------
def test_same_uids_in_two_partitions_are_independent(phttp):
    a, b = fresh_name("a"), fresh_name("b")
    base_a, base_b = f"/v2/partitions/{a}", f"/v2/partitions/{b}"
    pid = f"PID-{uuid.uuid4().hex[:8]}"
    in_a = make_dataset(PatientID=pid, PatientName="Alpha^Ann", AccessionNumber="ACC-A")
    in_b = make_dataset(
        study=in_a.StudyInstanceUID,
        series=in_a.SeriesInstanceUID,
        sop=in_a.SOPInstanceUID,
        PatientID=pid,
        PatientName="Beta^Bob",
        AccessionNumber="ACC-B",
    )
    store(phttp, base_a, in_a)
    store(phttp, base_b, in_b)  # same UIDs: no conflict across partitions
    s, se, sop = in_a.StudyInstanceUID, in_a.SeriesInstanceUID, in_a.SOPInstanceUID

    # retrieve
    for base, name in ((base_a, "Alpha^Ann"), (base_b, "Beta^Bob")):
        response = fetch_instance(phttp, base, in_a)
        assert response.status_code == 200
        assert str(pydicom.dcmread(io.BytesIO(response.content)).PatientName) == name
        study = phttp.get(f"{base}/studies/{s}", headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert study.status_code == 200 and name.encode() in study.content
    # metadata
    for base, accession in ((base_a, "ACC-A"), (base_b, "ACC-B")):
        for path in (f"/studies/{s}", f"/studies/{s}/series/{se}", f"/studies/{s}/series/{se}/instances/{sop}"):
            response = phttp.get(f"{base}{path}/metadata", headers=DICOM_JSON)
            assert response.status_code == 200
            assert [first(m, "00080050") for m in response.json()] == [accession]
    # search
    for base, name in ((base_a, "Alpha^Ann"), (base_b, "Beta^Bob")):
        found = qido(phttp, f"{base}/studies", {"PatientID": pid})
        assert [first(r, "00100010") for r in found] == [name]
        assert len(qido(phttp, f"{base}/instances", {"SOPInstanceUID": sop})) == 1
    # the default partition holds none of it
    assert qido(phttp, f"/v2/partitions/{DEFAULT}/studies", {"PatientID": pid}) == []
    assert phttp.get(f"/v2/partitions/{DEFAULT}/studies/{s}/metadata", headers=DICOM_JSON).status_code == 404

    # delete in one partition leaves the other
    assert phttp.delete(f"{base_a}/studies/{s}").status_code == 204
    assert fetch_instance(phttp, base_a, in_a).status_code == 404
    assert phttp.get(f"{base_a}/studies/{s}/metadata", headers=DICOM_JSON).status_code == 404
    assert qido(phttp, f"{base_a}/studies", {"PatientID": pid}) == []
    assert phttp.delete(f"{base_a}/studies/{s}").status_code == 404
    assert fetch_instance(phttp, base_b, in_a).status_code == 200
    assert [first(m, "00080050") for m in phttp.get(f"{base_b}/studies/{s}/metadata", headers=DICOM_JSON).json()] == [
        "ACC-B"
    ]
    assert [first(r, "00100010") for r in qido(phttp, f"{base_b}/studies", {"PatientID": pid})] == ["Beta^Bob"]
    # and the same UIDs can be stored again in the first one
    store(phttp, base_a, in_a)
    assert len(qido(phttp, f"{base_a}/studies", {"PatientID": pid})) == 1
    # series and instance deletes are scoped as well
    assert phttp.delete(f"{base_b}/studies/{s}/series/{se}/instances/{sop}").status_code == 204
    assert fetch_instance(phttp, base_a, in_a).status_code == 200
    assert phttp.delete(f"{base_a}/studies/{s}/series/{se}").status_code == 204
    assert qido(phttp, f"{base_a}/studies", {"PatientID": pid}) == []


def test_qido_never_crosses_partitions(phttp):
    a, b = fresh_name("qa"), fresh_name("qb")
    pid = f"PID-{uuid.uuid4().hex[:8]}"
    in_a = make_dataset(PatientID=pid, Modality="CT", AccessionNumber="X1")
    in_b = make_dataset(PatientID=pid, Modality="CT", AccessionNumber="X1")
    store(phttp, f"/v2/partitions/{a}", in_a)
    store(phttp, f"/v2/partitions/{b}", in_b)
    store(phttp, f"/v2/partitions/{DEFAULT}", make_dataset(PatientID=pid))
    for name, mine, other in ((a, in_a, in_b), (b, in_b, in_a)):
        base = f"/v2/partitions/{name}"
        for resource, tag, uid in (
            ("studies", "0020000D", mine.StudyInstanceUID),
            ("series", "0020000E", mine.SeriesInstanceUID),
            ("instances", "00080018", mine.SOPInstanceUID),
        ):
            found = qido(phttp, f"{base}/{resource}", {"PatientID": pid})
            assert [first(r, tag) for r in found] == [uid], (name, resource)
        wild = qido(phttp, f"{base}/studies", {"PatientID": pid[:-2] + "*", "ModalitiesInStudy": "CT"})
        assert [first(r, "0020000D") for r in wild] == [mine.StudyInstanceUID]
        listed = qido(
            phttp, f"{base}/studies", {"StudyInstanceUID": f"{in_a.StudyInstanceUID},{in_b.StudyInstanceUID}"}
        )
        assert [first(r, "0020000D") for r in listed] == [mine.StudyInstanceUID]
        assert qido(phttp, f"{base}/studies/{other.StudyInstanceUID}/series") == []
        assert qido(phttp, f"{base}/studies/{other.StudyInstanceUID}/instances") == []
        path = f"{base}/studies/{other.StudyInstanceUID}/series/{other.SeriesInstanceUID}/instances"
        assert qido(phttp, path) == []
        assert len(qido(phttp, f"{base}/studies/{mine.StudyInstanceUID}/series")) == 1
        v1 = qido(phttp, f"/v1/partitions/{name}/series", {"PatientID": pid})
        assert [first(r, "0020000E") for r in v1] == [mine.SeriesInstanceUID]
    default = qido(phttp, f"/v2/partitions/{DEFAULT}/studies", {"PatientID": pid, "includefield": "00201208"})
    assert len(default) == 1 and first(default[0], "00201208") == 1


def test_dicomweb_client_with_a_partition_url(partitioned_server):
    name = fresh_name("client")
    client = DICOMwebClient(url=f"{partitioned_server.url}/v2/partitions/{name}")
    other = DICOMwebClient(url=f"{partitioned_server.url}/v2/partitions/{DEFAULT}")
    ds = make_dataset(PatientName="Client^Partition", PatientID=f"PID-{uuid.uuid4().hex[:8]}")
    result = client.store_instances([ds])
    assert f"/partitions/{name}/" in result.ReferencedSOPSequence[0].RetrieveURL
    s, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert [first(r, "0020000D") for r in client.search_for_studies(search_filters={"PatientID": ds.PatientID})] == [s]
    assert other.search_for_studies(search_filters={"PatientID": ds.PatientID}) == []
    assert [first(r, "0020000E") for r in client.search_for_series(study_instance_uid=s)] == [se]
    found = client.search_for_instances(search_filters={"PatientName": "client^*"}, fields=["PatientID"])
    assert [(first(r, "00080018"), first(r, "00100020")) for r in found] == [(sop, ds.PatientID)]
    assert client.retrieve_instance(s, se, sop).PixelData == ds.PixelData
    assert first(client.retrieve_study_metadata(s)[0], "00100010") == "Client^Partition"
    client.delete_study(s)
    assert client.search_for_studies(search_filters={"PatientID": ds.PatientID}) == []


# -- errors -----------------------------------------------------------------------------------------------------------
def test_unknown_partition_is_rejected_on_every_route_but_store(phttp):
    s, se, sop = new_uid(), new_uid(), new_uid()
    base = f"/v2/partitions/{fresh_name('nope')}"
    for path in (
        "/studies",
        "/series",
        "/instances",
        f"/studies/{s}/series",
        f"/studies/{s}/instances",
        f"/studies/{s}/series/{se}/instances",
        f"/studies/{s}/metadata",
        f"/studies/{s}/series/{se}/metadata",
        f"/studies/{s}/series/{se}/instances/{sop}/metadata",
    ):
        expect_400(phttp.get(base + path, headers=DICOM_JSON), UNKNOWN)
    for path in (f"/studies/{s}", f"/studies/{s}/series/{se}", f"/studies/{s}/series/{se}/instances/{sop}"):
        expect_400(phttp.get(base + path, headers={"Accept": "*/*"}), UNKNOWN)
        expect_400(phttp.delete(base + path), UNKNOWN)
    expect_400(
        phttp.get(f"{base}/studies/{s}/series/{se}/instances/{sop}/frames/1", headers={"Accept": "*/*"}), UNKNOWN
    )
    # none of these created it
    assert base.rsplit("/", 1)[1] not in [p["partitionName"] for p in partitions(phttp)]


@pytest.mark.parametrize(
    "name", ["bad%20name%21", "a" * 65, "bad$name", "caf%C3%A9", "semi%3Bcolon", "%20", "a%0A", "%0A", "a%0D%0A"]
)
def test_invalid_partition_names(phttp, name):
    """'a%0A' (a line feed after a valid name) was accepted and created by STOW: ``^...$`` with ``match``."""
    base = f"/v2/partitions/{name}"
    expect_400(phttp.get(f"{base}/studies", headers=DICOM_JSON), INVALID)
    expect_400(phttp.get(f"{base}/studies/{new_uid()}/metadata", headers=DICOM_JSON), INVALID)
    expect_400(phttp.delete(f"{base}/studies/{new_uid()}"), INVALID)
    content_type, body = multipart([to_bytes(make_dataset())])
    response = phttp.post(f"{base}/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})
    expect_400(response, INVALID)


def test_partitions_named_like_routes(partitioned_server, phttp):
    for name in ("studies", "series", "instances"):
        ds = make_dataset()
        body = store(phttp, f"/v2/partitions/{name}", ds, study=ds.StudyInstanceUID)
        prefix = f"{partitioned_server.url}/v2/partitions/{name}/studies/{ds.StudyInstanceUID}"
        assert body["00081190"]["Value"] == [prefix]
        url = body["00081199"]["Value"][0]["00081190"]["Value"][0]
        assert url == f"{prefix}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        found = qido(phttp, f"/v2/partitions/{name}/series", {"StudyInstanceUID": ds.StudyInstanceUID})
        assert [first(r, "0020000E") for r in found] == [ds.SeriesInstanceUID]
        assert httpx.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"}).status_code == 200


def test_longest_and_odd_valid_names(phttp):
    for name in ("b" * 63 + uuid.uuid4().hex[:1], f"A.b_c-{uuid.uuid4().hex[:6]}"):
        assert len(name) <= 64
        ds = make_dataset()
        store(phttp, f"/v2/partitions/{name}", ds)
        assert name in [p["partitionName"] for p in partitions(phttp)]
        assert len(qido(phttp, f"/v2/partitions/{name}/studies", {"StudyInstanceUID": ds.StudyInstanceUID})) == 1


def test_missing_partition_segment_when_enabled(phttp):
    s, se, sop = new_uid(), new_uid(), new_uid()
    for path in ("/v2/studies", "/v2/series", "/v2/instances", f"/v2/studies/{s}/series", f"/v1/studies/{s}/metadata"):
        expect_400(phttp.get(path, headers=DICOM_JSON), MISSING)
    expect_400(phttp.get(f"/v2/studies/{s}/series/{se}/instances/{sop}", headers={"Accept": "*/*"}), MISSING)
    expect_400(phttp.delete(f"/v2/studies/{s}"), MISSING)
    content_type, body = multipart([to_bytes(make_dataset())])
    expect_400(phttp.post("/v2/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON}), MISSING)


def test_partition_routes_when_disabled(server, http):
    ds = make_dataset()
    store(http, "/v2", ds)  # the plain routes work
    for version in ("v1", "v2"):
        expect_400(http.get(f"/{version}/partitions"), DISABLED)
        for name in ("p1", DEFAULT, "bad name!"):
            base = f"/{version}/partitions/{name}"
            expect_400(http.get(f"{base}/studies", headers=DICOM_JSON), DISABLED)
            expect_400(http.get(f"{base}/studies/{ds.StudyInstanceUID}/metadata", headers=DICOM_JSON), DISABLED)
            expect_400(http.get(f"{base}/studies/{ds.StudyInstanceUID}", headers={"Accept": "*/*"}), DISABLED)
            expect_400(http.delete(f"{base}/studies/{ds.StudyInstanceUID}"), DISABLED)
            content_type, body = multipart([to_bytes(make_dataset())])
            response = http.post(f"{base}/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})
            expect_400(response, DISABLED)
    # nothing was deleted through the rejected routes
    found = qido(http, "/v2/studies", {"StudyInstanceUID": ds.StudyInstanceUID})
    assert [first(r, "0020000D") for r in found] == [ds.StudyInstanceUID]
    url = store(http, "/v2", make_dataset())["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert "/partitions/" not in url


def test_partitions_cannot_be_disabled_once_used(tmp_path):
    """Spec 5.7: once a non-default partition exists the feature cannot be turned off (the server refuses to start)."""
    data_dir = tmp_path / "archive"
    enabled = Server(data_dir, enable_partitions="true").start()
    try:
        with httpx.Client(base_url=enabled.url, timeout=60) as client:
            store(client, f"/v2/partitions/{fresh_name('kept')}", make_dataset())
    finally:
        enabled.stop()
    disabled = Server(data_dir)
    try:
        with pytest.raises(RuntimeError, match="server exited"):
            disabled.start()
        assert "DICOMHUB_ENABLE_PARTITIONS=true" in disabled.log_path.read_text()
    finally:
        disabled.stop()
