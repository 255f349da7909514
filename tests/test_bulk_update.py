"""Bulk update (``POST /v2/studies/$bulkUpdate``) and original-version retrieval (``msdicom-request-original``),
end to end through real servers on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom
import pytest

from dicomhub.dicom.uids import INVALID_UID_MESSAGE
from tests.conftest import start_server
from tests.factory import make_instance, multipart, new_uid
from tests.servers import Server

BULK = "/v2/studies/$bulkUpdate"
JSON = {"Content-Type": "application/json"}
ORIGINAL = {"msdicom-request-original": "true"}
ANY_DICOM = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
ONE_DICOM = {"Accept": "application/dicom; transfer-syntax=*"}
DICOM_JSON = {"Accept": "application/dicom+json"}
NEW_NAME = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Updated^Person"}]}}
PN_SHAPE = "A value of VR PN must be a JSON object of 'Alphabetic', 'Ideographic' and 'Phonetic' strings."


# -- helpers --------------------------------------------------------------------------------------------------------
def failed_attributes(comments: list[str]) -> dict:
    """Azure's 400 body for a change dataset: one Error Comment per problem in a Failed Attributes Sequence."""
    return {"00741048": {"vr": "SQ", "Value": [{"00000902": {"vr": "LO", "Value": [c]}} for c in comments]}}


def store(http: httpx.Client, parts: list[bytes], prefix: str = "/v2") -> None:
    content_type, body = multipart(parts)
    response = http.post(f"{prefix}/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})
    assert response.status_code == 200, response.text


def start_update(http: httpx.Client, studies: list[str], change: dict, prefix: str = "/v2") -> str:
    response = http.post(f"{prefix}/studies/$bulkUpdate", json={"studyInstanceUids": studies, "changeDataset": change})
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "href"} and len(body["id"]) == 32
    assert body["href"].endswith(f"/v2/operations/{body['id']}")
    assert response.headers["Location"] == body["href"]
    return body["id"]


def wait(http: httpx.Client, operation_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(f"/v2/operations/{operation_id}")
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        time.sleep(0.1)
    raise AssertionError(f"operation {operation_id} did not finish")


def update(http: httpx.Client, studies: list[str], change: dict, prefix: str = "/v2") -> dict:
    """Runs an update to its end and checks it succeeded; returns its results."""
    done = wait(http, start_update(http, studies, change, prefix))
    assert done["type"] == "update" and done["status"] == "succeeded" and done["percentComplete"] == 100, done
    return done["results"]


def instance_url(prefix: str, study: str, series: str, sop: str) -> str:
    return f"{prefix}/studies/{study}/series/{series}/instances/{sop}"


def pixel_section(data: bytes) -> bytes:
    """The bytes from the Pixel Data element to the end of a Part-10 file."""
    f = io.BytesIO(data)
    pydicom.dcmread(f, stop_before_pixels=True)
    return data[f.tell() :]


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def study_files(srv: Server, study: str) -> list[Path]:
    return sorted(p for p in (srv.data_dir / "blobs").rglob("*.dcm") if study in p.parts)


def feed_of(http: httpx.Client, since: datetime, study: str) -> list[dict]:
    start = since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    response = http.get("/v2/changefeed", params={"startTime": start, "limit": 200, "includeMetadata": "false"})
    assert response.status_code == 200, response.text
    return [e for e in response.json() if e["studyInstanceUid"] == study]


# -- validation -----------------------------------------------------------------------------------------------------
STUDY = "1.2.826.0.1.3680043.8.498.1"  # fixed: parameters must be the same in every xdist worker


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The syntax of the request body is invalid."),
        (b"{not json", "The syntax of the request body is invalid."),
        (b"[]", "The syntax of the request body is invalid."),
        (b'{"changeDataset": {}}', "The required field 'StudyInstanceUids' is missing or empty."),
        (
            b'{"studyInstanceUids": [], "changeDataset": {"00100010": {"vr": "PN"}}}',
            "The required field 'StudyInstanceUids' is missing or empty.",
        ),
        (b'{"studyInstanceUids": "1.2.3", "changeDataset": {}}', "The syntax of the request body is invalid."),
        (
            json.dumps({"studyInstanceUids": [f"1.2.{n}" for n in range(51)], "changeDataset": {}}).encode(),
            "StudyInstanceUids count exceeded maximum length '50'",
        ),
        (
            b'{"studyInstanceUids": ["1.a1.2"], "changeDataset": {}}',
            f"The StudyInstanceUid '1.a1.2' is invalid. {INVALID_UID_MESSAGE}",
        ),
        (f'{{"studyInstanceUids": ["{STUDY}"]}}'.encode(), "The required field 'ChangeDataset' is missing or empty."),
        (
            f'{{"StudyInstanceUIDs": ["{STUDY}"], "CHANGEDATASET": {{}}}}'.encode(),
            "The required field 'ChangeDataset' is missing or empty.",
        ),
    ],
)
def test_invalid_requests_are_400_with_azure_messages(http: httpx.Client, body: bytes, message: str) -> None:
    response = http.post(BULK, content=body, headers=JSON)
    assert response.status_code == 400
    assert response.text == message


def test_unsupported_tags_and_invalid_values_answer_a_failed_attributes_dataset(http: httpx.Client) -> None:
    change = {
        "00080060": {"vr": "CS", "Value": ["MR"]},  # Modality: a series attribute, not updatable
        "00100030": {"vr": "DA", "Value": ["2024-01-01"]},  # updatable, but not a DA value
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Fine^Name"}]},
        "00101002": {"vr": "SQ", "Value": []},  # OtherPatientIDsSequence: sequences are not updatable
        "00100040": {"vr": "CS"},  # PatientSex without a value: updating to null is not supported
    }
    response = http.post(BULK, json={"studyInstanceUids": [new_uid()], "changeDataset": change})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    comments = [
        "DICOM100: (0008,0060) - Updating the tag is not supported",
        'DICOM100: (0010,0030) - Content "2024-01-01" does not validate VR DA: '
        "one of the date values does not match the pattern YYYYMMDD",
        "DICOM100: (0010,1002) - Updating the tag is not supported",
        "DICOM100: (0010,0040) - Updating the tag to an empty value is not supported",
    ]
    assert response.json() == {
        "00741048": {"vr": "SQ", "Value": [{"00000902": {"vr": "LO", "Value": [c]}} for c in comments]}
    }


@pytest.mark.parametrize(
    ("value", "comment"),
    [
        ({"vr": "PN", "InlineBinary": "AAAA"}, "The value must be given as 'Value', not as 'InlineBinary'."),
        ({"vr": "PN", "Value": [5]}, PN_SHAPE),
        ({"vr": "PN", "Value": ["Plain^String"]}, PN_SHAPE),
        ({"vr": "PN", "Value": [{"Alphabetic": {"x": 1}}]}, PN_SHAPE),
        ({"vr": "PN", "Value": [{"Nickname": "Bob"}]}, PN_SHAPE),
        ({"vr": "PN", "Value": {"Alphabetic": "A^B"}}, "'Value' must be a JSON array."),
    ],
)
def test_change_values_of_the_wrong_json_type_are_refused(http: httpx.Client, value: dict, comment: str) -> None:
    """A value pydicom would keep as it is (bytes, a number, an object) must never reach the stored operation: the
    InlineBinary of a PN was a 500 (bytes are not JSON serializable) when the operation was created."""
    response = http.post(BULK, json={"studyInstanceUids": [new_uid()], "changeDataset": {"00100010": value}})
    assert response.status_code == 400, response.text
    assert response.json() == failed_attributes([f"DICOM100: (0010,0010) - {comment}"])


def test_change_values_are_checked_against_the_json_types_of_their_vr(http: httpx.Client) -> None:
    change = {
        "00100020": {"vr": "LO", "Value": [{"a": 1}]},  # PatientID
        "00100030": {"vr": "DA", "Value": [20240101]},  # PatientBirthDate
        "00100040": {"vr": "CS", "Value": [True]},  # PatientSex
        "00101020": {"vr": "DS", "Value": [False]},  # PatientSize: a number, but not a boolean
        "00101030": {"vr": "DS", "Value": [72.5]},  # PatientWeight: fine
        "00081030": {"vr": "LO", "BulkDataURI": "http://example.org/x"},  # StudyDescription
        "00104000": {"vr": "LT", "Value": [["nested"]]},  # PatientComments
    }
    response = http.post(BULK, json={"studyInstanceUids": [new_uid()], "changeDataset": change})
    assert response.status_code == 400, response.text
    assert response.json() == failed_attributes(
        [
            "DICOM100: (0010,0020) - A value of VR LO must be a JSON string.",
            "DICOM100: (0010,0030) - A value of VR DA must be a JSON string.",
            "DICOM100: (0010,0040) - A value of VR CS must be a JSON string.",
            "DICOM100: (0010,1020) - A value of VR DS must be a JSON number or string.",
            "DICOM100: (0008,1030) - The value must be given as 'Value', not as 'BulkDataURI'.",
            "DICOM100: (0010,4000) - A value of VR LT must be a JSON string.",
        ]
    )


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000 + b"]" * 1000,
        b'{"studyInstanceUids": ["1.2.3"], "changeDataset": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
        b'{"studyInstanceUids": ["1.2.3"], "changeDataset": {"00101030": {"vr": "DS", "Value": [NaN]}}}',
        b'{"studyInstanceUids": ["1.2.3"], "changeDataset": {"00101030": {"vr": "DS", "Value": [1e999]}}}',
    ],
)
def test_deep_or_non_standard_json_is_a_syntax_error(http: httpx.Client, body: bytes) -> None:
    """JSON nested ~1000 deep was a RecursionError (500); NaN and infinities are not JSON (PostgreSQL refuses them)."""
    response = http.post(BULK, content=body, headers=JSON)
    assert (response.status_code, response.text) == (400, "The syntax of the request body is invalid.")


def test_change_keys_must_be_eight_hex_digits(http: httpx.Client) -> None:
    """``int(key, 16)`` also reads '+0100010' or ' 0100010' as PatientName."""
    for key in ("+0100010", " 0100010", "0010_010", "\uff10\uff10\uff11\uff10\uff10\uff10\uff11\uff10"):
        response = http.post(
            BULK, json={"studyInstanceUids": [new_uid()], "changeDataset": {key: NEW_NAME["00100010"]}}
        )
        assert response.status_code == 400, (key, response.text)
        assert response.text == f"The field 'changeDataset' in request body is invalid: '{key}' is not a DICOM tag."


def test_a_body_over_one_megabyte_is_413(http: httpx.Client) -> None:
    body = json.dumps({"studyInstanceUids": [STUDY], "changeDataset": NEW_NAME, "padding": "x" * (1 << 20)})
    response = http.post(BULK, content=body.encode(), headers=JSON)
    assert (response.status_code, response.text) == (413, "The request body is larger than the limit of 1048576 bytes.")


def test_v1_has_no_bulk_update_and_the_body_must_be_json(http: httpx.Client) -> None:
    body = {"studyInstanceUids": [new_uid()], "changeDataset": NEW_NAME}
    assert http.post("/v1/studies/$bulkUpdate", json=body).status_code == 404
    response = http.post(BULK, content=b"{}", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.text


def test_unknown_study_succeeds_with_nothing_updated(http: httpx.Client) -> None:
    results = update(http, [new_uid()], NEW_NAME)
    # Azure's WhenUpdatingForAUnknownStudy_ThenItShouldCompleteOperationSuccessfully: processed, but not updated
    assert results == {"studyProcessed": 1, "studyUpdated": 0, "studyFailed": 0, "instanceUpdated": 0}


# -- the update itself ----------------------------------------------------------------------------------------------
def test_update_rewrites_files_metadata_index_and_feed_and_keeps_the_original(
    http: httpx.Client, server: Server
) -> None:
    since = datetime.now(UTC)
    study, series = new_uid(), new_uid()
    sops = [new_uid() for _ in range(3)]
    sent = {
        sops[0]: make_instance(
            study=study, series=series, sop=sops[0], rows=64, columns=48, frames=3, PatientID="OLD-ID"
        ),
        sops[1]: make_instance(study=study, series=series, sop=sops[1], PatientID="OLD-ID"),
        sops[2]: make_instance(study=study, sop=sops[2], PatientID="OLD-ID", StudyDescription="Old description"),
    }
    series_of = {sop: pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID for sop, data in sent.items()}
    store(http, list(sent.values()))
    etag_before = http.get(f"/v2/studies/{study}/metadata", headers=DICOM_JSON).headers["ETag"]
    other = new_uid()  # a study not named in the request stays as it is
    store(http, [make_instance(study=other, PatientID="OLD-ID")])

    change = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Renamed^Patient"}]},
        "00100020": {"vr": "LO", "Value": ["NEW-ID"]},
        "00081030": {"vr": "LO", "Value": ["New description"]},
    }
    results = update(http, [study], change)
    assert results == {"studyProcessed": 1, "studyUpdated": 1, "studyFailed": 0, "instanceUpdated": 3}

    # QIDO: new values match, old ones do not
    found = http.get("/v2/studies", params={"PatientName": "renamed^patient"}, headers=DICOM_JSON)
    assert [s["0020000D"]["Value"][0] for s in found.json()] == [study]
    assert found.json()[0]["00100010"]["Value"] == [{"Alphabetic": "Renamed^Patient"}]
    fuzzy = http.get("/v2/studies", params={"PatientName": "renam", "fuzzymatching": "true"}, headers=DICOM_JSON)
    assert study in [s["0020000D"]["Value"][0] for s in fuzzy.json()]
    assert http.get("/v2/studies", params={"PatientID": "NEW-ID"}, headers=DICOM_JSON).status_code == 200
    old = http.get("/v2/studies", params={"PatientID": "OLD-ID", "StudyInstanceUID": study}, headers=DICOM_JSON)
    assert old.status_code == 204
    old_name = http.get(
        "/v2/studies", params={"PatientName": "Test^Patient", "StudyInstanceUID": study}, headers=DICOM_JSON
    )
    assert old_name.status_code == 204
    series_rows = http.get(f"/v2/studies/{study}/series", headers=DICOM_JSON).json()
    assert len(series_rows) == 2
    untouched = http.get("/v2/studies", params={"StudyInstanceUID": other}, headers=DICOM_JSON).json()
    assert untouched[0]["00100020"]["Value"] == ["OLD-ID"]

    # metadata: new values, new ETag; the original on request
    latest = http.get(f"/v2/studies/{study}/metadata", headers=DICOM_JSON)
    assert latest.headers["ETag"] != etag_before
    for item in latest.json():
        assert item["00100010"]["Value"] == [{"Alphabetic": "Renamed^Patient"}]
        assert item["00100020"]["Value"] == ["NEW-ID"]
        assert item["00081030"]["Value"] == ["New description"]
    original = http.get(f"/v2/studies/{study}/metadata", headers={**DICOM_JSON, **ORIGINAL})
    assert original.headers["ETag"] == etag_before
    assert sorted(i["00100020"]["Value"][0] for i in original.json()) == ["OLD-ID"] * 3
    assert {i["00100010"]["Value"][0]["Alphabetic"] for i in original.json()} == {"Test^Patient"}

    for sop, data in sent.items():
        url = instance_url("/v2", study, series_of[sop], sop)
        new = http.get(url, headers=ONE_DICOM)
        assert new.status_code == 200
        ds = pydicom.dcmread(io.BytesIO(new.content))
        assert str(ds.PatientName) == "Renamed^Patient" and ds.PatientID == "NEW-ID"
        assert ds.StudyDescription == "New description"
        assert ds.file_meta.ImplementationClassUID == "1.3.6.1.4.1.311.129"
        assert ds.file_meta.ImplementationVersionName.startswith("dicomhub")
        assert ds.SOPInstanceUID == sop and ds.StudyInstanceUID == study
        assert pixel_section(new.content) == pixel_section(data)  # pixel data copied byte for byte
        assert ds.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData
        assert http.get(url, headers={**ONE_DICOM, **ORIGINAL}).content == data  # exactly as stored
        assert http.get(url, headers={**ONE_DICOM, "msdicom-request-original": "TRUE"}).content == data
        assert http.get(url, headers={**ONE_DICOM, "msdicom-request-original": "false"}).content == new.content
        instance_etag = http.get(f"{url}/metadata", headers=DICOM_JSON).headers["ETag"]
        original_etag = http.get(f"{url}/metadata", headers={**DICOM_JSON, **ORIGINAL}).headers["ETag"]
        assert int(instance_etag) > int(original_etag)

    # frames still come from the (unchanged) pixel data, by the ranges of the new file
    multi = instance_url("/v2", study, series, sops[0])
    frames = http.get(f"{multi}/frames/2", headers={"Accept": "application/octet-stream; transfer-syntax=*"})
    original_ds = pydicom.dcmread(io.BytesIO(sent[sops[0]]))
    frame_length = 64 * 48 * 2
    assert frames.content == original_ds.PixelData[frame_length : 2 * frame_length]

    # study retrieve: the original versions as a multipart body when asked
    whole = http.get(f"/v2/studies/{study}", headers={**ANY_DICOM, **ORIGINAL})
    assert whole.status_code == 200
    assert all(data in whole.content for data in sent.values())

    # change feed: the update is Current, what came before Replaced
    entries = feed_of(http, since, study)
    assert sorted(e["action"] for e in entries) == ["Create"] * 3 + ["Update"] * 3
    assert {e["state"] for e in entries if e["action"] == "Update"} == {"Current"}
    assert {e["state"] for e in entries if e["action"] == "Create"} == {"Replaced"}

    # one file per version on disk: the original and the latest
    assert len(study_files(server, study)) == 6


def test_second_update_keeps_the_first_original_and_drops_the_intermediate(http: httpx.Client, server: Server) -> None:
    since = datetime.now(UTC)
    study, series, sop = new_uid(), new_uid(), new_uid()
    data = make_instance(study=study, series=series, sop=sop, AccessionNumber="ACC-1")
    store(http, [data])
    url = instance_url("/v2", study, series, sop)
    update(http, [study], {"00080050": {"vr": "SH", "Value": ["ACC-2"]}})
    first = http.get(url, headers=ONE_DICOM).content
    update(http, [study], {"00080050": {"vr": "SH", "Value": ["ACC-3"]}, **NEW_NAME})

    latest = pydicom.dcmread(io.BytesIO(http.get(url, headers=ONE_DICOM).content))
    assert latest.AccessionNumber == "ACC-3" and str(latest.PatientName) == "Updated^Person"
    assert http.get(url, headers={**ONE_DICOM, **ORIGINAL}).content == data
    meta = http.get(f"{url}/metadata", headers={**DICOM_JSON, **ORIGINAL}).json()[0]
    assert meta["00080050"]["Value"] == ["ACC-1"]
    assert http.get("/v2/studies", params={"AccessionNumber": "ACC-2"}, headers=DICOM_JSON).status_code == 204
    assert http.get("/v2/studies", params={"AccessionNumber": "ACC-3"}, headers=DICOM_JSON).status_code == 200

    # the intermediate version's file is cleaned up: the original and the latest remain
    wait_until(lambda: len(study_files(server, study)) == 2)
    on_disk = {p.read_bytes() for p in study_files(server, study)}
    assert data in on_disk and first not in on_disk

    entries = feed_of(http, since, study)
    assert [(e["action"], e["state"]) for e in entries] == [
        ("Create", "Replaced"),
        ("Update", "Replaced"),
        ("Update", "Current"),
    ]


def test_delete_after_update_removes_both_versions(http: httpx.Client, server: Server) -> None:
    study, series, sop = new_uid(), new_uid(), new_uid()
    store(http, [make_instance(study=study, series=series, sop=sop, rows=32, columns=32, frames=2)])
    update(http, [study], NEW_NAME)
    assert len(study_files(server, study)) == 2
    assert http.delete(f"/v2/studies/{study}").status_code == 204
    url = instance_url("/v2", study, series, sop)
    for headers in ({}, ORIGINAL):
        assert http.get(url, headers={**ONE_DICOM, **headers}).status_code == 404
        assert http.get(f"/v2/studies/{study}/metadata", headers={**DICOM_JSON, **headers}).status_code == 404
    wait_until(lambda: study_files(server, study) == [])


def test_non_ascii_names_make_a_default_repertoire_file_utf8(http: httpx.Client) -> None:
    study, series, sop = new_uid(), new_uid(), new_uid()
    store(http, [make_instance(study=study, series=series, sop=sop)])
    update(http, [study], {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Zoë"}]}})
    ds = pydicom.dcmread(io.BytesIO(http.get(instance_url("/v2", study, series, sop), headers=ONE_DICOM).content))
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Zoë"
    meta = http.get(f"/v2/studies/{study}/metadata", headers=DICOM_JSON).json()[0]
    assert meta["00080005"]["Value"] == ["ISO_IR 192"]
    found = http.get("/v2/studies", params={"PatientName": "muller^zoe"}, headers=DICOM_JSON)
    assert [s["0020000D"]["Value"][0] for s in found.json()] == [study]


def test_retrieve_original_of_an_instance_never_updated_is_the_instance(http: httpx.Client) -> None:
    study, series, sop = new_uid(), new_uid(), new_uid()
    data = make_instance(study=study, series=series, sop=sop)
    store(http, [data])
    url = instance_url("/v2", study, series, sop)
    assert http.get(url, headers={**ONE_DICOM, **ORIGINAL}).content == data
    plain = http.get(f"{url}/metadata", headers=DICOM_JSON)
    original = http.get(f"{url}/metadata", headers={**DICOM_JSON, **ORIGINAL})
    assert original.json() == plain.json() and original.headers["ETag"] == plain.headers["ETag"]


# -- partitions -----------------------------------------------------------------------------------------------------
def test_partitioned_update_changes_only_its_partition(partitioned_server: Server) -> None:
    with httpx.Client(base_url=partitioned_server.url, timeout=60) as http:
        study, series, sop = new_uid(), new_uid(), new_uid()
        data = make_instance(study=study, series=series, sop=sop)
        store(http, [data], "/v2/partitions/alpha")
        store(http, [data], "/v2/partitions/beta")
        results = update(http, [study], NEW_NAME, "/v2/partitions/alpha")
        assert results["instanceUpdated"] == 1
        alpha = http.get(instance_url("/v2/partitions/alpha", study, series, sop), headers=ONE_DICOM).content
        beta = http.get(instance_url("/v2/partitions/beta", study, series, sop), headers=ONE_DICOM).content
        assert str(pydicom.dcmread(io.BytesIO(alpha)).PatientName) == "Updated^Person"
        assert beta == data
        missing = http.post(
            "/v2/partitions/nowhere/studies/$bulkupdate",
            json={"studyInstanceUids": [study], "changeDataset": NEW_NAME},
        )
        assert missing.status_code == 400 and missing.text == "Specified PartitionName does not exist."
        assert http.post(BULK, json={"studyInstanceUids": [study], "changeDataset": NEW_NAME}).status_code == 400


# -- one update at a time, and workers outside the server -----------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def idle_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that runs no operations itself: ``dicomhub worker`` processes do (short leases, for take-over)."""
    srv = start_server(
        tmp_path_factory,
        request.param,
        run_operations="false",
        operation_lease_seconds="3",
        stale_create_seconds="5",  # also how long a new version's file is reserved before its commit
    )
    yield srv
    srv.stop()


def start_worker(srv: Server) -> subprocess.Popen:
    log = open(srv.data_dir / "worker.log", "ab")  # noqa: SIM115 - owned by the child process
    env = {**srv.env(), "DICOMHUB_OPERATION_POLL_SECONDS": "0.05"}
    return subprocess.Popen([sys.executable, "-m", "dicomhub", "worker"], env=env, stdout=log, stderr=log)


def stop_worker(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        process.wait(timeout=30)


def test_only_one_update_runs_at_a_time(idle_server: Server) -> None:
    with httpx.Client(base_url=idle_server.url, timeout=60) as http:
        study = new_uid()
        store(http, [make_instance(study=study)])
        first = start_update(http, [study], NEW_NAME)
        second = http.post(BULK, json={"studyInstanceUids": [new_uid()], "changeDataset": NEW_NAME})
        assert second.status_code == 409
        assert second.text == f"There is already an active update operation with ID '{first}'."
        assert http.get(f"/v2/operations/{first}").json()["status"] == "notStarted"
        worker = start_worker(idle_server)
        try:
            done = wait(http, first)
        finally:
            stop_worker(worker)
        assert done["status"] == "succeeded" and done["results"]["instanceUpdated"] == 1
        assert (
            http.get(f"/v2/studies/{study}/metadata", headers=DICOM_JSON).json()[0]["00100010"] == NEW_NAME["00100010"]
        )
        # once it is over, the next one may start (and is run to its end: the module's next test needs it so)
        last = start_update(http, [new_uid()], NEW_NAME)
        worker = start_worker(idle_server)
        try:
            assert wait(http, last)["status"] == "succeeded"
        finally:
            stop_worker(worker)


def test_worker_killed_mid_update_is_resumed_to_the_same_final_state(idle_server: Server) -> None:
    since = datetime.now(UTC)
    with httpx.Client(base_url=idle_server.url, timeout=60) as http:
        study, series = new_uid(), new_uid()
        sent = {}
        for _ in range(4):  # 64 instances of ~1 MB in four requests
            batch = {}
            for _ in range(16):
                sop = new_uid()
                batch[sop] = make_instance(study=study, series=series, sop=sop, rows=512, columns=1024)
            store(http, list(batch.values()))
            sent.update(batch)
        operation = start_update(http, [study], NEW_NAME)
        worker = start_worker(idle_server)

        def updated() -> int:
            items = http.get(f"/v2/studies/{study}/metadata", headers=DICOM_JSON).json()
            return sum(1 for item in items if item["00100010"] == NEW_NAME["00100010"])

        try:
            wait_until(lambda: updated() > 0, timeout=60)  # the first batch is committed
        finally:
            stop_worker(worker, signal.SIGKILL)
        killed_at = updated()
        worker = start_worker(idle_server)
        try:
            done = wait(http, operation, timeout=120)
        finally:
            stop_worker(worker)
        assert done["status"] == "succeeded"
        assert done["results"] == {"studyProcessed": 1, "studyUpdated": 1, "studyFailed": 0, "instanceUpdated": 64}
        assert updated() == 64
        for sop, data in list(sent.items())[::8]:
            url = instance_url("/v2", study, series, sop)
            assert http.get(url, headers={**ONE_DICOM, **ORIGINAL}).content == data
            assert pixel_section(http.get(url, headers=ONE_DICOM).content) == pixel_section(data)
        whole = http.get(f"/v2/studies/{study}", headers=ANY_DICOM)  # every latest version has its file
        assert whole.status_code == 200 and whole.content.count(b"DICM") == 64
        entries = feed_of(http, since, study)
        updates = [e for e in entries if e["action"] == "Update"]
        assert len(updates) == 64 and {e["state"] for e in updates} == {"Current"}  # one new version each
        wait_until(lambda: len(study_files(idle_server, study)) == 128, timeout=30)  # orphans of the kill cleaned up
        print(f"killed after {killed_at} of 64 instances were updated")


# -- extended query tags --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def tag_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Its own server: extended query tags are global, other tests' servers must not see this one's."""
    srv = start_server(tmp_path_factory, request.param)
    yield srv
    srv.stop()


def test_update_reindexes_extended_query_tags(tag_server: Server) -> None:
    with httpx.Client(base_url=tag_server.url, timeout=60) as http:
        added = http.post("/v2/extendedquerytags", json=[{"path": "00100040", "vr": "CS", "level": "Study"}])
        assert added.status_code == 202, added.text
        assert wait(http, added.json()["id"])["status"] == "succeeded"
        study = new_uid()
        store(http, [make_instance(study=study, PatientSex="F"), make_instance(study=study, PatientSex="F")])
        before = http.get("/v2/studies", params={"PatientSex": "F"}, headers=DICOM_JSON)
        assert [s["0020000D"]["Value"][0] for s in before.json()] == [study]

        update(http, [study], {"00100040": {"vr": "CS", "Value": ["M"]}})
        after = http.get("/v2/studies", params={"PatientSex": "M"}, headers=DICOM_JSON)
        assert [s["0020000D"]["Value"][0] for s in after.json()] == [study]
        assert http.get("/v2/studies", params={"PatientSex": "F"}, headers=DICOM_JSON).status_code == 204
