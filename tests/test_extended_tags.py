"""Extended query tags end to end: the tag API (add, list, get, update, delete, errors), the re-index operation (also
across a crash and with two worker processes sharing it) and QIDO on the new tags.

Extended query tags are global to a server, so these tests run on servers of their own (the session ``server`` of
other test files never sees these tags), and each test uses tags no other test of the module adds.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicomhub.index.engine import make_engine
from tests.conftest import ENGINES, start_server
from tests.factory import make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server, database_url

JSON = {"Accept": "application/dicom+json"}
FAST = {"operation_poll_seconds": "0.1"}


# -- helpers ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ENGINES)
def eqt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory, request.param, **FAST)
    yield srv
    srv.stop()


@pytest.fixture
def http(eqt: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=eqt.url, timeout=60) as client:
        yield client


def root(http: httpx.Client) -> str:
    return str(http.base_url).rstrip("/")


def store(http: httpx.Client, *datasets: Dataset, version: str = "v2") -> None:
    for start in range(0, len(datasets), 100):
        content_type, body = multipart([to_bytes(ds) for ds in datasets[start : start + 100]])
        response = http.post(f"/{version}/studies", content=body, headers={"Content-Type": content_type, **JSON})
        assert response.status_code in (200, 202), response.text


def add(http: httpx.Client, entries: list[dict], version: str = "v2") -> str:
    """Adds tags; returns the operation href after checking the 202 answer."""
    response = http.post(f"/{version}/extendedquerytags", json=entries)
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "href"} and len(body["id"]) == 32
    assert body["href"] == f"{root(http)}/{version}/operations/{body['id']}"
    assert response.headers["location"] == body["href"]
    return body["href"]


def wait(http: httpx.Client, href: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(href)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        assert response.headers["location"] == href
        time.sleep(0.1)
    raise AssertionError(f"operation {href} did not finish")


def add_and_wait(http: httpx.Client, entries: list[dict], version: str = "v2") -> dict:
    state = wait(http, add(http, entries, version))
    assert state["status"] == ("completed" if version == "v1" else "succeeded"), state
    assert state["percentComplete"] == 100 and state["type"] == "reindex"
    return state


def search(http: httpx.Client, path: str, params: dict) -> list[dict]:
    response = http.get(f"/v2{path}", params={"limit": 200, **params}, headers=JSON)
    if response.status_code == 204:
        return []
    assert response.status_code == 200, response.text
    return response.json()


def uids(results: list[dict], key: str = "0020000D") -> set[str]:
    return {r[key]["Value"][0] for r in results}


def rejected(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.text


def engine_of(srv: Server) -> sa.Engine:
    return sa.create_engine(srv.database_url or f"sqlite:///{srv.data_dir / 'index.db'}")


def tag_rows(srv: Server, path: str) -> dict[str, int]:
    """Index rows per table of one tag, read straight from the index."""
    engine = engine_of(srv)
    try:
        with engine.connect() as conn:
            key = conn.execute(sa.text("SELECT tag_key FROM extended_query_tag WHERE path = :p"), {"p": path}).scalar()
            if key is None:
                key = -1
            return {
                table: conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE tag_key = :k"), {"k": key}).scalar()
                for table in ("extended_string", "extended_long", "extended_double", "extended_name_word")
            }
    finally:
        engine.dispose()


# -- add: validation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "non-empty array"),
        ({"Path": "StationName", "Level": "Study"}, "non-empty array"),
        (
            [{"Level": "Study"}],
            "The field '[0].Path' in request body is invalid: The Dicom Tag Property Path must be specified",
        ),
        (
            [{"Path": "StationName", "Level": " "}],
            "The field '[0].Level' in request body is invalid: The Dicom Tag Property Level must be specified and "
            "must not be null, empty or whitespace",
        ),
        (
            [{"Path": "StationName", "Level": "Studys"}],
            "The field '$[0].Level' in request body is invalid: Expected value 'Studys' to be one of the following "
            "values: ['Instance', 'Series', 'Study']",
        ),
        ([{"Path": "00101002.00100020", "Level": "Study"}], "Sequential dicom tags are currently not supported."),
        ([{"Path": "NotAKeyword", "Level": "Study"}], "'NotAKeyword' is invalid as it cannot be parsed"),
        ([{"Path": "0010101", "Level": "Study"}], "'0010101' is invalid as it cannot be parsed"),
        ([{"Path": "ManufacturerModelName", "Level": "Series"}], "The query tag 'ManufacturerModelName' is already"),
        ([{"Path": "00100010", "Level": "Study"}], "The query tag '00100010' is already supported."),
        (
            [{"Path": "StationName", "VR": "LO", "Level": "Series"}],
            "The VR code 'LO' is incorrectly specified for 'StationName'. The expected VR code for it is 'SH'.",
        ),
        ([{"Path": "PatientWeight", "Level": "Study"}], "The VR code 'DS' for tag 'PatientWeight' is not supported."),
        ([{"Path": "StudyComments", "Level": "Study"}], "The VR code 'LT' for tag 'StudyComments' is not supported."),
        ([{"Path": "00191001", "PrivateCreator": "ACME", "Level": "Study"}], "The vr for tag '00191001' is missing."),
        ([{"Path": "00191001", "VR": "LO", "Level": "Study"}], "private creator for private tag '00191001' is missing"),
        (
            [{"Path": "00191001", "VR": "LO", "PrivateCreator": "A\\B", "Level": "Study"}],
            "The private creator 'A\\B' of tag '00191001' exceeds maximum length or contains invalid character.",
        ),
        (
            [{"Path": "StationName", "PrivateCreator": "ACME", "Level": "Series"}],
            "The private creator for tag 'StationName' must be empty.",
        ),
        (
            [{"Path": "00190010", "PrivateCreator": "ACME", "Level": "Series"}],
            "The private creator for private identification code '00190010' must be empty.",
        ),
        (
            [{"Path": "StationName", "Level": "Series"}, {"path": "00081010", "level": "series"}],
            "The extended query tag '00081010' has been specified before.",
        ),
    ],
)
def test_add_rejects_invalid_entries(http: httpx.Client, entries, message: str) -> None:
    before = http.get("/v2/extendedquerytags").json()
    assert message in rejected(http.post("/v2/extendedquerytags", json=entries))
    assert http.get("/v2/extendedquerytags").json() == before  # nothing was added


def test_add_rejects_bad_bodies(http: httpx.Client) -> None:
    response = http.post("/v2/extendedquerytags", content=b"[{", headers={"Content-Type": "application/json"})
    assert rejected(response) == "The syntax of the request body is invalid."
    response = http.post("/v2/extendedquerytags", content=b"[]", headers={"Content-Type": "text/plain"})
    assert "text/plain" in rejected(response, 415)
    assert http.post("/v3/extendedquerytags", json=[{"Path": "StationName", "Level": "Series"}]).status_code == 404
    # no partition variant: the route does not exist there
    assert http.get("/v2/partitions/Microsoft.Default/extendedquerytags").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000 + b"]" * 1000,  # a RecursionError: it was a 500
        b'[{"path": "StationName", "level": "Series", "x": ' + b"[" * 100 + b"]" * 100 + b"}]",
        b'[{"path": "StationName", "level": "Series", "x": NaN}]',
        b"\xff\xfe[",
    ],
)
def test_deep_or_non_standard_json_bodies_are_syntax_errors(http: httpx.Client, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    for response in (
        http.post("/v2/extendedquerytags", content=body, headers=headers),
        http.patch("/v2/extendedquerytags/StationName", content=body, headers=headers),
    ):
        assert rejected(response) == "The syntax of the request body is invalid."
        assert response.headers["content-type"].startswith("text/plain")


def test_bodies_over_one_megabyte_are_413(http: httpx.Client) -> None:
    body = json.dumps([{"path": "StationName", "level": "Series", "padding": "x" * (1 << 20)}])
    response = http.post("/v2/extendedquerytags", content=body, headers={"Content-Type": "application/json"})
    assert rejected(response, 413) == "The request body is larger than the limit of 1048576 bytes."


def test_paths_and_paging_with_a_trailing_line_feed_are_invalid(http: httpx.Client) -> None:
    """``^...$`` with ``match`` lets a final line feed through: '00101010\\n' was looked up as a tag."""
    assert rejected(http.get("/v2/extendedquerytags/00101010%0A")) == (
        "The extended query tag path '00101010\n' is invalid."
    )
    assert "'limit' is invalid" in rejected(http.get("/v2/extendedquerytags", params={"limit": "5\n"}))
    assert "'offset' is invalid" in rejected(http.get("/v2/extendedquerytags", params={"offset": "0\n"}))


# -- add, re-index, QIDO -------------------------------------------------------------------------------------------
def private_dataset(value: str, creator: str = "ACME 1.0", **attributes) -> Dataset:
    ds = make_dataset(**attributes)
    ds.private_block(0x0019, creator, create=True).add_new(0x01, "LO", value)
    return ds


def test_reindex_then_query_at_every_level(http: httpx.Client) -> None:
    """Instances stored before the add are indexed by the re-index, those stored after at store time; QIDO matches
    them like core tags (exact, wildcard, range, fuzzy, UID list, numbers) at the tag's level."""
    station = f"ST{new_uid()[-10:]}"  # a value no other test stores
    study_a, study_b, series_a = new_uid(), new_uid(), new_uid()
    frame_a, frame_b = new_uid(), new_uid()
    store(
        http,
        private_dataset(
            "Secret Value",
            study=study_a,
            series=series_a,
            StationName=station,
            PerformingPhysicianName="Smith^John",
            AcquisitionDateTime="20240102103000",
            ContentTime="101500",
            InstanceNumber=7,
            ExaminedBodyThickness=1.1,
            NumberOfStudyRecordsInInstance=4000000000,
            FrameOfReferenceUID=frame_a,
            PatientAge="041Y",
        ),
        private_dataset(
            "other",
            study=study_b,
            StationName=station,
            PerformingPhysicianName=["Doe^Jane", "Smith^John"],  # only the first value is indexed
            AcquisitionDateTime="20240301",
            ContentTime="2359",
            InstanceNumber=8,
            FrameOfReferenceUID=frame_b,
            PatientAge="",  # empty: not indexed
        ),
    )
    tags = {
        "StationName": "Series",
        "PerformingPhysicianName": "series",
        "AcquisitionDateTime": "Instance",
        "ContentTime": "INSTANCE",
        "InstanceNumber": "Instance",
        "ExaminedBodyThickness": "Instance",
        "NumberOfStudyRecordsInInstance": "Instance",
        "FrameOfReferenceUID": "Series",
        "PatientAge": "Study",
    }
    entries = [{"Path": k, "Level": v} for k, v in tags.items()]
    entries.append({"path": "00191001", "vr": "lo", "privateCreator": "ACME 1.0", "level": "study"})
    href = add(http, entries)
    adding = http.get("/v2/extendedquerytags/StationName").json()
    if adding["status"] == "adding":  # the operation may already be done
        assert adding["operation"] == {"id": href.rsplit("/", 1)[1], "href": href}
    state = wait(http, href)
    assert state["status"] == "succeeded" and state["percentComplete"] == 100 and state["type"] == "reindex"
    paths = [f"{int(tag_for_keyword(k)):08X}" for k in tags] + ["00191001"]
    assert sorted(state["resources"]) == sorted(f"{root(http)}/v2/extendedquerytags/{p}" for p in paths)
    assert http.get("/v2/extendedquerytags/StationName").json() == {
        "path": "00081010",
        "vr": "SH",
        "level": "series",
        "status": "ready",
        "queryStatus": "enabled",
    }
    assert http.get("/v2/extendedquerytags/00191001").json() == {
        "path": "00191001",
        "vr": "LO",
        "privateCreator": "ACME 1.0",
        "level": "study",
        "status": "ready",
        "queryStatus": "enabled",
    }

    # series level: exact (case-insensitive), wildcard; not at study level
    assert uids(search(http, "/series", {"StationName": station.lower()})) == {study_a, study_b}
    assert uids(search(http, "/series", {"StationName": station[:4] + "*"})) >= {study_a, study_b}
    assert "is not queryable" in rejected(http.get("/v2/studies", params={"StationName": station}, headers=JSON))
    found = search(http, f"/studies/{study_a}/series", {"StationName": station})
    assert [r["00081010"]["Value"][0] for r in found] == [station]  # the filter attribute is returned
    # person name: exact folded, fuzzy prefix of any component, first value only
    assert uids(search(http, "/series", {"PerformingPhysicianName": "smith^john"})) == {study_a}
    assert study_a in uids(search(http, "/series", {"PerformingPhysicianName": "jo", "fuzzymatching": "true"}))
    assert study_b not in uids(search(http, "/series", {"PerformingPhysicianName": "smi", "fuzzymatching": "true"}))
    assert study_b in uids(search(http, "/series", {"PerformingPhysicianName": "do ja", "fuzzymatching": "true"}))
    assert not search(http, "/series", {"PerformingPhysicianName": "mith", "fuzzymatching": "true"})
    # UID list at series level
    assert uids(search(http, "/series", {"FrameOfReferenceUID": f"{frame_a},{frame_b}"})) == {study_a, study_b}
    # instance level: DT and TM ranges, numbers (IS, FL at single precision, UL beyond 32-bit signed)
    assert uids(search(http, "/instances", {"AcquisitionDateTime": "20240102-20240102235959"})) == {study_a}
    assert uids(search(http, "/instances", {"AcquisitionDateTime": "20240301"})) == {study_b}
    both = {study_a, study_b}
    assert uids(search(http, "/instances", {"AcquisitionDateTime": "2024-", "StationName": station})) == both
    assert study_a in uids(search(http, "/instances", {"ContentTime": "1000-1100"}))
    assert study_b not in uids(search(http, "/instances", {"ContentTime": "1000-1100"}))
    assert uids(search(http, f"/studies/{study_b}/instances", {"ContentTime": "235900"})) == {study_b}
    assert uids(search(http, "/instances", {"InstanceNumber": "7", "StationName": station})) == {study_a}
    assert uids(search(http, "/instances", {"ExaminedBodyThickness": "1.1"})) == {study_a}
    assert uids(search(http, "/instances", {"NumberOfStudyRecordsInInstance": "4000000000"})) == {study_a}
    # study level: the empty PatientAge of study B was not indexed; private tag by its hex path
    assert uids(search(http, "/studies", {"PatientAge": "041Y"})) == {study_a}
    assert uids(search(http, "/studies", {"00191001": "secret value"})) == {study_a}
    # query errors as for core tags
    for params, text in (
        ({"AcquisitionDateTime": "20240102+0100"}, "contains offset which is not supported"),
        ({"AcquisitionDateTime": "20241301"}, "is invalid for attribute 'AcquisitionDateTime'"),
        ({"AcquisitionDateTime": "20240102\n"}, "is invalid for attribute 'AcquisitionDateTime'"),
        ({"AcquisitionDateTime": "\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0662"}, "is invalid for attribute"),
        ({"ContentTime": "1000\n"}, "is invalid for attribute 'ContentTime'"),
        ({"ContentTime": "25"}, "is invalid for attribute 'ContentTime'"),
        ({"ContentTime": "-"}, "Both parts in the range cannot be empty"),
        ({"InstanceNumber": "seven"}, "is not a valid IS value"),
    ):
        assert text in rejected(http.get("/v2/instances", params=params, headers=JSON))

    # stored after the add: indexed at store time (study level: the newest instance wins)
    study_c = new_uid()
    store(http, private_dataset("late", study=study_c, StationName=station, PatientAge="041Y"))
    assert uids(search(http, "/series", {"StationName": station})) == {study_a, study_b, study_c}
    assert uids(search(http, "/studies", {"00191001": "LATE"})) == {study_c}
    store(http, make_dataset(study=study_c, PatientAge="050Y"))
    assert study_c not in uids(search(http, "/studies", {"PatientAge": "041Y"}))
    assert uids(search(http, "/studies", {"PatientAge": "050Y"})) == {study_c}
    # includefield of an extended tag returns it from the stored metadata
    found = search(http, "/instances", {"InstanceNumber": "8", "includefield": "StationName"})
    assert [r["00081010"]["Value"] for r in found if r["0020000D"]["Value"][0] == study_b] == [[station]]

    # deleting a study removes its values at every level
    assert http.delete(f"/v2/studies/{study_a}").status_code == 204
    assert not search(http, "/instances", {"ExaminedBodyThickness": "1.1"})
    assert not search(http, "/studies", {"00191001": "secret value"})
    assert uids(search(http, "/series", {"StationName": station})) == {study_b, study_c}


def test_v1_reports_completed(http: httpx.Client) -> None:
    study = new_uid()
    store(http, make_dataset(study=study, StationAETitle="V1AE"), version="v1")
    state = add_and_wait(http, [{"Path": "StationAETitle", "Level": "Study"}], version="v1")
    assert state["status"] == "completed"
    assert state["resources"] == [f"{root(http)}/v1/extendedquerytags/00080055"]
    assert uids(search(http, "/studies", {"StationAETitle": "v1ae"})) == {study}


# -- errors, query status, get/list/update/delete -------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values made on purpose
def test_indexing_errors_disable_query_until_enabled(http: httpx.Client) -> None:
    """v1 validates only core attributes strictly, so invalid values of other attributes are stored; the re-index
    records them as errors of the tag and disables querying it."""
    good, bad_date, too_long = new_uid(), new_uid(), new_uid()
    store(http, make_dataset(study=good, AcquisitionDate="20200101", ProtocolName="Good"), version="v1")
    store(http, make_dataset(study=bad_date, AcquisitionDate="2020-01-01"), version="v1")
    store(http, make_dataset(study=too_long, ProtocolName="P" * 80, EventTimeOffset=float("nan")), version="v1")
    add_and_wait(
        http,
        [
            {"Path": "AcquisitionDate", "Level": "Series"},
            {"Path": "ProtocolName", "Level": "Series"},
            {"Path": "EventTimeOffset", "Level": "Instance"},
        ],
    )
    errors = http.get("/v2/extendedquerytags/EventTimeOffset/errors").json()
    assert [(e["studyInstanceUid"], e["errorMessage"]) for e in errors] == [
        (too_long, "The value 'nan' of extended query tag '00082134' is not a finite number.")
    ]

    for keyword, path, study, fragment in (
        ("AcquisitionDate", "00080022", bad_date, "does not validate VR DA"),
        ("ProtocolName", "00181030", too_long, "exceeds the maximum length of 64 allowed for VR LO"),
    ):
        entry = http.get(f"/v2/extendedquerytags/{keyword}").json()
        href = f"{root(http)}/v2/extendedquerytags/{path}/errors"
        assert entry["queryStatus"] == "disabled" and entry["status"] == "ready"
        assert entry["errors"] == {"count": 1, "href": href}
        errors = http.get(href).json()
        assert len(errors) == 1
        assert errors[0]["studyInstanceUid"] == study and errors[0]["partitionName"] == "Microsoft.Default"
        assert set(errors[0]) == {
            "studyInstanceUid",
            "seriesInstanceUid",
            "sopInstanceUid",
            "createdTime",
            "errorMessage",
            "partitionName",
        }
        assert fragment in errors[0]["errorMessage"]
        message = rejected(http.get("/v2/series", params={keyword: "X*"}, headers=JSON))
        assert message == f"Query is disabled on specified attribute '{keyword}'."

    # enabled again by hand: queries work, and answers name the attributes whose index has errors
    response = http.patch("/v2/extendedquerytags/AcquisitionDate", json={"QueryStatus": "Enabled"})
    assert response.status_code == 200 and response.json()["queryStatus"] == "enabled"
    response = http.get("/v2/series", params={"AcquisitionDate": "20200101"}, headers=JSON)
    assert response.status_code == 200 and uids(response.json()) == {good}
    assert response.headers["erroneous-dicom-attributes"] == "00080022"
    # a later store with an invalid value adds an error at store time, and disables the tag again
    late = new_uid()
    store(http, make_dataset(study=late, AcquisitionDate="31.12.2020"), version="v1")
    entry = http.get("/v2/extendedquerytags/00080022").json()
    assert entry["queryStatus"] == "disabled" and entry["errors"]["count"] == 2
    page = http.get("/v2/extendedquerytags/00080022/errors", params={"limit": 1, "offset": 1}).json()
    assert [e["studyInstanceUid"] for e in page] == [late]
    assert http.get("/v2/extendedquerytags/00080022/errors", params={"offset": 2}).json() == []


def test_get_list_update_delete(eqt: Server, http: httpx.Client) -> None:
    study = new_uid()
    store(http, make_dataset(study=study, OperatorsName="Op^Erator", SeriesTime="120000"))
    add_and_wait(http, [{"Path": "OperatorsName", "Level": "Series"}, {"Path": "SeriesTime", "Level": "Series"}])

    listed = http.get("/v2/extendedquerytags").json()
    paths = [t["path"] for t in listed]
    assert {"00081070", "00080031"} <= set(paths)
    assert [t["path"] for t in http.get("/v2/extendedquerytags", params={"limit": 1, "offset": 1}).json()] == [paths[1]]
    assert http.get("/v2/extendedquerytags", params={"offset": len(paths)}).json() == []
    for params in ({"limit": 0}, {"limit": 201}, {"limit": "x"}, {"offset": -1}):
        assert "is invalid" in rejected(http.get("/v2/extendedquerytags", params=params))
    assert http.get("/v2/extendedquerytags/00081070").json() == http.get("/v2/extendedquerytags/OperatorsName").json()
    assert "is invalid" in rejected(http.get("/v2/extendedquerytags/NoSuchKeyword"))
    assert "cannot be found" in rejected(http.get("/v2/extendedquerytags/00091234"), 404)
    assert "cannot be found" in rejected(http.get("/v2/extendedquerytags/00091234/errors"), 404)

    # update: only QueryStatus, values case-insensitive
    response = http.patch("/v2/extendedquerytags/OperatorsName", json={"QueryStatus": "disabled"})
    assert response.status_code == 200 and response.json()["queryStatus"] == "disabled"
    message = rejected(http.get("/v2/series", params={"OperatorsName": "Op^Erator"}, headers=JSON))
    assert message == "Query is disabled on specified attribute 'OperatorsName'."
    response = http.patch("/v2/extendedquerytags/OperatorsName", json={"queryStatus": "ENABLED"})
    assert response.json()["queryStatus"] == "enabled"
    assert uids(search(http, "/series", {"OperatorsName": "op^erator"})) == {study}
    assert rejected(http.patch("/v2/extendedquerytags/OperatorsName", json={"Level": "Study"})) == (
        'The field is not supported: "Level"'
    )
    assert "Expected value 'On'" in rejected(
        http.patch("/v2/extendedquerytags/OperatorsName", json={"QueryStatus": "On"})
    )
    assert rejected(http.patch("/v2/extendedquerytags/00091234", json={"QueryStatus": "Enabled"}), 404)

    # delete: the tag and its index data go; it is then unknown to QIDO
    assert tag_rows(eqt, "00081070")["extended_string"] == 1
    assert tag_rows(eqt, "00081070")["extended_name_word"] == 2
    assert http.delete("/v2/extendedquerytags/OperatorsName").status_code == 204
    assert tag_rows(eqt, "00081070") == dict.fromkeys(tag_rows(eqt, "00081070"), 0)
    assert "cannot be found" in rejected(http.get("/v2/extendedquerytags/OperatorsName"), 404)
    assert "is not queryable" in rejected(http.get("/v2/series", params={"OperatorsName": "x"}, headers=JSON))
    assert "cannot be found" in rejected(http.delete("/v2/extendedquerytags/OperatorsName"), 404)
    # a tag that exists cannot be added again
    message = rejected(http.post("/v2/extendedquerytags", json=[{"Path": "SeriesTime", "Level": "Series"}]), 409)
    assert "00080031" in message and "already exist" in message
    # added again after the delete: indexed anew
    add_and_wait(http, [{"Path": "OperatorsName", "Level": "Study"}])
    assert uids(search(http, "/studies", {"OperatorsName": "OP^ERATOR"})) == {study}


def test_too_many_tags_is_a_client_error(tmp_path) -> None:
    srv = Server(tmp_path, None, max_extended_query_tags="2", **FAST).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            entries = [{"Path": k, "Level": "Study"} for k in ("StationName", "OperatorsName", "ProtocolName")]
            message = rejected(http.post("/v2/extendedquerytags", json=entries))
            assert message == "Extended query tags exceeds max allowed count '2'."
            add_and_wait(http, entries[:2])
            assert rejected(http.post("/v2/extendedquerytags", json=entries[2:])) == message
            assert len(http.get("/v2/extendedquerytags").json()) == 2
    finally:
        srv.stop()


# -- the re-index operation: workers, crash ------------------------------------------------------------------------
def tiny(study: str, number: int, **attributes) -> Dataset:
    """A small instance (one pixel): thousands store in seconds."""
    return make_dataset(study=study, rows=1, columns=1, InstanceNumber=number, **attributes)


def store_many(http: httpx.Client, count: int, per_study: int = 10) -> list[str]:
    studies = [new_uid() for _ in range(count // per_study)]
    datasets = [
        tiny(study, i, DeviceSerialNumber=f"D{i % 10}", InstitutionName=f"INST{s % 5}")
        for s, study in enumerate(studies)
        for i in range(s * per_study, (s + 1) * per_study)
    ]
    store(http, *datasets)
    return studies


def check_reindexed(srv: Server, http: httpx.Client, count: int, studies: list[str]) -> None:
    """Every instance is found by its instance-level value, every study by its study-level value, exactly once."""
    for digit in range(10):
        found = []
        for offset in range(0, count, 200):
            found += search(
                http,
                "/instances",
                {"DeviceSerialNumber": f"D{digit}", "offset": offset, "includefield": "InstanceNumber"},
            )
        numbers = sorted(r["00200013"]["Value"][0] for r in found)
        assert numbers == list(range(digit, count, 10))
    for group in range(5):
        found = search(http, "/studies", {"InstitutionName": f"inst{group}"})
        assert uids(found) == set(studies[group::5]) and len(found) == len(studies[group::5])
    assert tag_rows(srv, "00181000")["extended_string"] == count  # DeviceSerialNumber: one row per instance
    assert tag_rows(srv, "00080080")["extended_string"] == len(studies)


def task_rows(srv: Server, operation_id: str) -> list[tuple[int, int, dict]]:
    engine = engine_of(srv)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT status, attempts, result FROM operation_task WHERE operation_id = :id"),
                {"id": operation_id},
            ).all()
    finally:
        engine.dispose()
    return [(r[0], r[1], json.loads(r[2]) if r[2] else {}) for r in rows]


@contextlib.contextmanager
def held_operation(srv: Server, operation_id: str) -> Iterator[None]:
    """Keeps workers off the operation while the block runs: SQLite's write lock (their claims wait for it), or the
    operation's row lock on PostgreSQL (their SKIP LOCKED claims pass it over)."""
    engine = make_engine(srv.database_url or f"sqlite:///{srv.data_dir / 'index.db'}")
    try:
        with engine.connect().execution_options(write=True) as conn, conn.begin():  # SQLite: BEGIN IMMEDIATE
            if engine.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT id FROM operation WHERE id = :id FOR UPDATE"), {"id": operation_id})
            yield
    finally:
        engine.dispose()


def wait_for_line(path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{path.name}: no '{text}' after {timeout} s"
        time.sleep(0.1)


REINDEX_TAGS = [{"Path": "DeviceSerialNumber", "Level": "Instance"}, {"Path": "InstitutionName", "Level": "Study"}]


@pytest.mark.parametrize("engine", ENGINES)
def test_operation_waits_for_workers_then_two_share_it(engine: str, tmp_path) -> None:
    """With operations off in the server, an added tag stays ``adding`` (not queryable, not deletable, a second add
    is a 409 pointing at the running operation); two ``dicomhub worker`` processes then share the tasks, each done
    exactly once (SQLite: the same, serialized by its write lock)."""
    srv = Server(
        tmp_path, database_url(engine), run_operations="false", reindex_batch_size="20", fsync="false", **FAST
    ).start()
    workers: list[subprocess.Popen] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            studies = store_many(http, 600)
            href = add(http, REINDEX_TAGS)
            operation_id = href.rsplit("/", 1)[1]
            time.sleep(0.5)
            running = http.get(href)
            assert running.status_code == 202 and running.headers["location"] == href
            assert running.json()["status"] == "notStarted" and running.json()["percentComplete"] == 0
            entry = http.get("/v2/extendedquerytags/DeviceSerialNumber").json()
            assert entry["status"] == "adding" and entry["operation"] == {"id": operation_id, "href": href}
            message = rejected(http.get("/v2/instances", params={"DeviceSerialNumber": "D1"}, headers=JSON))
            assert "is not queryable" in message
            assert "is being added" in rejected(http.delete("/v2/extendedquerytags/DeviceSerialNumber"))
            second = http.post("/v2/extendedquerytags", json=[{"Path": "StationName", "Level": "Series"}])
            assert second.status_code == 409 and second.headers["location"] == href
            assert operation_id in second.text
            assert http.get("/v2/extendedquerytags/StationName").status_code == 404  # nothing was added

            with held_operation(srv, operation_id):  # neither worker starts before both are up
                for n in range(2):
                    log = tmp_path / f"worker-{n}.log"
                    with log.open("w") as out:
                        workers.append(
                            subprocess.Popen(
                                [sys.executable, "-m", "dicomhub", "worker"],
                                env=srv.env(),
                                stdout=subprocess.DEVNULL,
                                stderr=out,
                            )
                        )
                    wait_for_line(log, "operation worker started")
            state = wait(http, href)
            assert state["status"] == "succeeded"
            check_reindexed(srv, http, 600, studies)
            assert http.get("/v2/extendedquerytags/DeviceSerialNumber").json()["status"] == "ready"
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=30)
        srv.stop()
    tasks = task_rows(srv, operation_id)
    assert len(tasks) == 600 // 20  # watermark ranges of 20 over the 600 instances
    assert all(status == 1 and attempts == 1 for status, attempts, _ in tasks)
    assert sum(result["instances"] for _, _, result in tasks) == 600
    if engine == "postgres":
        # both took tasks: SKIP LOCKED claims run side by side. On SQLite claims queue on the write lock, and with
        # tasks this short the busy-waiting second process may find none left, so only exactly-once is asserted.
        assert len({result["worker"] for _, _, result in tasks}) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_reindex_resumes_after_kill(engine: str, tmp_path) -> None:
    """The server is killed (SIGKILL) half-way through a re-index; restarted on the same data, it finishes the
    operation, and the index equals that of an uninterrupted run (every instance once, no duplicates)."""
    settings = {"reindex_batch_size": "15", "operation_lease_seconds": "3", "fsync": "false", **FAST}
    count = 1500  # 100 tasks
    srv = Server(tmp_path, database_url(engine), **settings).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            studies = store_many(http, count)
            href = add(http, REINDEX_TAGS)
            path = href.split("/v2/", 1)[1]
            while True:
                state = http.get(href).json()
                assert state["status"] in ("notStarted", "running"), "finished before it could be interrupted"
                if state["percentComplete"] >= 10:
                    break
                time.sleep(0.02)
            srv.kill(signal.SIGKILL)
        assert state["percentComplete"] < 90
    finally:
        srv.stop()
    operation_id = path.rsplit("/", 1)[1]
    assert any(status == 0 for status, _, _ in task_rows(srv, operation_id))  # work was left

    restarted = Server(tmp_path, srv.database_url, **settings).start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=60) as http:
            state = wait(http, f"{restarted.url}/v2/{path}")
            assert state["status"] == "succeeded" and state["percentComplete"] == 100
            check_reindexed(restarted, http, count, studies)
            entry = http.get("/v2/extendedquerytags/DeviceSerialNumber").json()
            assert entry["status"] == "ready" and entry["queryStatus"] == "enabled" and "errors" not in entry
    finally:
        restarted.stop()
    tasks = task_rows(restarted, operation_id)
    assert all(status == 1 for status, _, _ in tasks)
    assert sum(result["instances"] for _, _, result in tasks) == count
    # a task cut short by the kill (if one was running) ran again, once
    assert all(attempts in (1, 2) for _, attempts, _ in tasks)
