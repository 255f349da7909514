"""STOW-RS end to end: response datasets, status codes and failure codes as Azure's DICOM service answers them.

Every test talks HTTP to a real server (SQLite and PostgreSQL) and uses fresh UIDs, so tests never see each other's
instances. Files with fixed UIDs (pydicom's test files) get new UIDs first.
"""

from __future__ import annotations

import io
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from tests.factory import (
    RGB_SAMPLES,
    make_dataset,
    make_instance,
    make_rgb_sample,
    make_rgb_samples,
    multipart,
    new_uid,
    to_bytes,
)
from tests.servers import Server

DICOM_JSON = "application/dicom+json"
ACCEPT = {"Accept": DICOM_JSON}
SINGLE = {"Accept": DICOM_JSON, "Content-Type": "application/dicom"}
ANY_SYNTAX = {"Accept": "application/dicom; transfer-syntax=*"}

# Several tests write invalid values on purpose; pydicom warns about each when it encodes them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length .* exceeds the maximum length:UserWarning"),
]

VALIDATION_FAILURE = 43264
INSTANCE_EXISTS = 45070
INSTANCE_BEING_CREATED = 45071
IMPLICIT_VR_WARNING = 45063
VALIDATION_WARNING = 1
MULTI_VALUE_WARNING = '"One or more indexed Dicom tag(s) have multiple values, only first value is indexed."'
PATIENT_ID_MISSING = "DICOM100: (0010,0020) - The required tag '(0010,0020)' is missing."
STUDY_MISMATCH = (
    "DICOM100: (0020,000d) - The StudyInstanceUid in the payload does not match the specified StudyInstanceUid."
)


# -- helpers ------------------------------------------------------------------------------------------------------
def failed_items(body: dict) -> list[dict]:
    return body.get("00081198", {}).get("Value", [])


def referenced_items(body: dict) -> list[dict]:
    return body.get("00081199", {}).get("Value", [])


def first(item: dict, tag: str):
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def comments(item: dict) -> list[str]:
    return [c["00000902"]["Value"][0] for c in item.get("00741048", {}).get("Value", [])]


def reasons(body: dict) -> list[int]:
    return [first(item, "00081197") for item in failed_items(body)]


def store(http: httpx.Client, version: str, data: bytes, study: str | None = None, **headers: str) -> httpx.Response:
    path = f"/{version}/studies" + (f"/{study}" if study else "")
    return http.post(path, content=data, headers={**SINGLE, **headers})


def store_parts(http: httpx.Client, version: str, parts: list[bytes], study: str | None = None, **kw) -> httpx.Response:
    content_type, body = multipart(parts, **kw)
    path = f"/{version}/studies" + (f"/{study}" if study else "")
    return http.post(path, content=body, headers={**ACCEPT, "Content-Type": content_type})


def instance_path(version: str, study: str, series: str, sop: str) -> str:
    return f"/{version}/studies/{study}/series/{series}/instances/{sop}"


def fetch(http: httpx.Client, study: str, series: str, sop: str) -> bytes:
    response = http.get(instance_path("v2", study, series, sop), headers=ANY_SYNTAX)
    assert response.status_code == 200, response.text
    return response.content


def visible_count(http: httpx.Client, sop: str) -> int:
    """How many instances QIDO finds with this SOP Instance UID (0 when the answer is 204)."""
    response = http.get("/v2/instances", params={"SOPInstanceUID": sop}, headers=ACCEPT)
    assert response.status_code in (200, 204), response.text
    return len(response.json()) if response.status_code == 200 else 0


def metadata(http: httpx.Client, ds) -> dict:
    response = http.get(
        instance_path("v2", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) + "/metadata",
        headers=ACCEPT,
    )
    assert response.status_code == 200, response.text
    (model,) = response.json()
    return model


def raw_element(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element written byte for byte, bypassing pydicom's value checks (to store invalid values)."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def with_new_uids(raw: bytes) -> bytes:
    """The same file with Study/Series/SOP Instance UIDs replaced by fresh ones of equal length (same byte layout)."""
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    mapping: dict[str, str] = {}
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        uid = str(uid).rstrip("\0 ")
        if uid not in mapping:
            prefix, _, last = uid.rpartition(".")
            digits = str(random.randint(1, 9)) + "".join(random.choices("0123456789", k=len(last) - 1))
            mapping[uid] = f"{prefix}.{digits}"
    for old in sorted(mapping, key=len, reverse=True):
        raw = raw.replace(old.encode(), mapping[old].encode())
    return raw


def implicit_vr_instance() -> tuple[bytes, pydicom.Dataset]:
    """pydicom's MR_small_implicit.dcm (Implicit VR Little Endian) with fresh UIDs."""
    data = with_new_uids(Path(get_testdata_file("MR_small_implicit.dcm")).read_bytes())
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    return data, ds


# -- single part and response shape -------------------------------------------------------------------------------
def test_single_part_store_response_dataset(server, http, version):
    ds = make_dataset()
    response = store(http, version, to_bytes(ds))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(DICOM_JSON)
    assert "warning" not in response.headers
    body = response.json()
    assert set(body) == {"00081199"}, "no FailedSOPSequence and no study RetrieveURL without a study in the path"
    (item,) = referenced_items(body)
    assert item["00081150"] == {"vr": "UI", "Value": [ds.SOPClassUID]}
    assert item["00081155"] == {"vr": "UI", "Value": [ds.SOPInstanceUID]}
    url = first(item, "00081190")
    assert item["00081190"]["vr"] == "UR"
    assert url == server.url + instance_path(version, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert "00081196" not in item
    if version == "v2":
        assert item["00741048"] == {"vr": "SQ"}, "v2 success items always carry an empty FailedAttributesSequence"
    else:
        assert "00741048" not in item
    # the RetrieveURL works as given
    fetched = httpx.get(url, headers=ANY_SYNTAX)
    assert fetched.status_code == 200
    assert pydicom.dcmread(io.BytesIO(fetched.content)).SOPInstanceUID == ds.SOPInstanceUID


def test_multipart_of_several_instances_with_dicomweb_client(server, http):
    study, series = new_uid(), new_uid()
    datasets = [make_dataset(study=study, series=series, InstanceNumber=n) for n in (1, 2, 3)]
    client = DICOMwebClient(url=f"{server.url}/v2")
    result = client.store_instances(datasets)
    stored = [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence]
    assert stored == [ds.SOPInstanceUID for ds in datasets]
    assert all(
        item.RetrieveURL.endswith(f"/v2/studies/{study}/series/{series}/instances/{item.ReferencedSOPInstanceUID}")
        for item in result.ReferencedSOPSequence
    )
    assert "FailedSOPSequence" not in result
    found = client.search_for_instances(study, series)
    assert sorted(r["00080018"]["Value"][0] for r in found) == sorted(stored)
    for ds in datasets:
        assert pydicom.dcmread(io.BytesIO(fetch(http, study, series, ds.SOPInstanceUID))).PixelData == ds.PixelData


def test_multipart_parts_without_content_type_use_the_type_parameter(http, version):
    datasets = [make_dataset(), make_dataset()]
    response = store_parts(http, version, [to_bytes(ds) for ds in datasets], part_type=None)
    assert response.status_code == 200, response.text
    assert [first(i, "00081155") for i in referenced_items(response.json())] == [ds.SOPInstanceUID for ds in datasets]


def test_multipart_with_one_part_of_another_type_is_415_and_stores_nothing(http):
    good, other = make_dataset(), make_dataset()
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + to_bytes(good)
        + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + to_bytes(other)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 415
    assert "application/octet-stream" in response.text
    assert visible_count(http, good.SOPInstanceUID) == 0
    assert visible_count(http, other.SOPInstanceUID) == 0


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("multipart/form-data; boundary=b0undary", "multipart/form-data"),
        ('multipart/related; type="application/dicom"', "boundary"),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", "transfer-syntax"),
        ("application/octet-stream", "application/octet-stream"),
        ("application/dicom+json", "application/dicom+json"),
        ('multipart/related; type="application/dicom+xml"; boundary=b0undary', "application/dicom+xml"),
        (None, "Content-Type"),
    ],
)
def test_unsupported_content_types_are_415_with_a_message(http, content_type, message):
    ds = make_dataset()
    _, body = multipart([to_bytes(ds)], boundary="b0undary")
    request = http.build_request("POST", "/v2/studies", content=body, headers=ACCEPT)
    if content_type:
        request.headers["Content-Type"] = content_type
    response = http.send(request)
    assert response.status_code == 415
    assert message in response.text
    assert visible_count(http, ds.SOPInstanceUID) == 0


def test_start_parameter_is_400(http):
    ds = make_dataset()
    content_type, body = multipart([to_bytes(ds)])
    response = http.post(
        "/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type + '; start="<part1@x>"'}
    )
    assert response.status_code == 400
    assert response.text == "The start parameter in multipart/related request is not supported."
    assert visible_count(http, ds.SOPInstanceUID) == 0


def test_empty_multipart_is_204(http, version):
    content_type, body = multipart([])
    assert body == b"--dicomhub-test-boundary--\r\n"
    response = http.post(f"/{version}/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.parametrize("damage", ["truncated", "no-closing-boundary", "garbage", "empty", "header-without-colon"])
def test_malformed_multipart_is_400_and_stores_nothing(http, damage):
    complete, second = make_dataset(), make_dataset()
    content_type, body = multipart([to_bytes(complete), to_bytes(second)])
    if damage == "truncated":  # the first part is whole, the second is cut in its pixel data
        body = body[: len(body) - 300]
    elif damage == "no-closing-boundary":
        body = body[: body.rindex(b"--dicomhub-test-boundary--")]
    elif damage == "garbage":
        body = b"this is not a multipart body at all"
    elif damage == "empty":
        body = b""
    else:
        body = body.replace(b"Content-Type: application/dicom", b"Content-Type application/dicom", 1)
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert "multipart request body is malformed" in response.text
    assert visible_count(http, complete.SOPInstanceUID) == 0
    assert visible_count(http, second.SOPInstanceUID) == 0


def test_multipart_preamble_and_epilogue_are_ignored(http):
    """RFC 2046: text before the first boundary and after the closing one is not part of any body part."""
    ds = make_dataset()
    content_type, body = multipart([to_bytes(ds)])
    body = b"This is a multipart message preamble.\r\n" + body + b"trailing epilogue\r\n"
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == to_bytes(ds)


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("application/dicom", 406),
        ("application/data", 406),
        ("application/dicom+json+something", 406),
        ("image/jpeg, application/dicom", 406),
        (None, 406),
        ("application/dicom+json", 200),
        ("APPLICATION/DICOM+JSON; charset=utf-8", 200),
        ("*/*", 200),
        ("application/*", 200),
        ("application/json", 200),
        ("application/dicom, application/dicom+json;q=0.5", 200),
    ],
)
def test_accept_header_negotiation(http, accept, status):
    ds = make_dataset()
    request = http.build_request(
        "POST", "/v2/studies", content=to_bytes(ds), headers={"Content-Type": "application/dicom"}
    )
    if accept is None:
        del request.headers["Accept"]
    else:
        request.headers["Accept"] = accept
    response = http.send(request)
    assert response.status_code == status, response.text
    if status == 406:
        assert response.content == b""
        assert visible_count(http, ds.SOPInstanceUID) == 0
    else:
        assert first(referenced_items(response.json())[0], "00081155") == ds.SOPInstanceUID


# -- duplicates ----------------------------------------------------------------------------------------------------
def test_duplicate_instance_is_409_with_45070(http, version):
    data = make_instance()
    assert store(http, version, data).status_code == 200
    response = store(http, version, data)
    assert response.status_code == 409
    body = response.json()
    assert "00081199" not in body
    (item,) = failed_items(body)
    assert first(item, "00081197") == INSTANCE_EXISTS
    assert first(item, "00081155") == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID


def test_same_instance_twice_in_one_request_is_202(http, version):
    ds = make_dataset()
    response = store_parts(http, version, [to_bytes(ds), to_bytes(ds)])
    assert response.status_code == 202, response.text
    body = response.json()
    assert [first(i, "00081155") for i in referenced_items(body)] == [ds.SOPInstanceUID]
    assert reasons(body) == [INSTANCE_EXISTS]
    assert visible_count(http, ds.SOPInstanceUID) == 1


@pytest.mark.parametrize("padded", ["SOPInstanceUID", "StudyInstanceUID"])
def test_restore_with_space_padded_uid_is_a_duplicate(http, padded):
    ds = make_dataset()
    assert store(http, "v2", to_bytes(ds)).status_code == 200
    setattr(ds, padded, getattr(ds, padded) + "  ")
    response = store(http, "v2", to_bytes(ds))
    assert response.status_code == 409, response.text
    assert reasons(response.json()) == [INSTANCE_EXISTS]
    assert visible_count(http, ds.SOPInstanceUID.rstrip()) == 1


# -- study in the path and UID rules --------------------------------------------------------------------------------
def test_study_in_path_with_an_instance_of_another_study_is_202(server, http, version):
    study = new_uid()
    mine, foreign = make_dataset(study=study), make_dataset()
    response = store_parts(http, version, [to_bytes(mine), to_bytes(foreign)], study=study)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["00081190"] == {"vr": "UR", "Value": [f"{server.url}/{version}/studies/{study}"]}
    assert [first(i, "00081155") for i in referenced_items(body)] == [mine.SOPInstanceUID]
    (failed,) = failed_items(body)
    assert first(failed, "00081155") == foreign.SOPInstanceUID
    assert first(failed, "00081150") == foreign.SOPClassUID
    assert first(failed, "00081197") == VALIDATION_FAILURE
    assert comments(failed) == [STUDY_MISMATCH]
    assert visible_count(http, foreign.SOPInstanceUID) == 0


def test_study_in_path_with_only_other_studies_is_409(http, version):
    study = new_uid()
    others = [make_dataset(), make_dataset()]
    response = store_parts(http, version, [to_bytes(ds) for ds in others], study=study)
    assert response.status_code == 409
    body = response.json()
    assert "00081190" not in body, "no study RetrieveURL when nothing was stored"
    assert reasons(body) == [VALIDATION_FAILURE, VALIDATION_FAILURE]
    assert all(visible_count(http, ds.SOPInstanceUID) == 0 for ds in others)


def test_study_in_path_matching_single_part_is_200(server, http):
    ds = make_dataset()
    response = store(http, "v1", to_bytes(ds), study=ds.StudyInstanceUID)
    assert response.status_code == 200
    assert response.json()["00081190"]["Value"] == [f"{server.url}/v1/studies/{ds.StudyInstanceUID}"]


@pytest.mark.parametrize("bad", ["1" * 65, "notAUid", "1.2.3a", "1..2.x"])
def test_invalid_study_uid_in_url_is_400(http, version, bad):
    ds = make_dataset()
    response = store(http, version, to_bytes(ds), study=bad)
    assert response.status_code == 400
    assert f"The StudyInstanceUID '{bad}' is invalid." in response.text
    assert "DICOM Identifier is invalid" in response.text
    assert visible_count(http, ds.SOPInstanceUID) == 0


@pytest.mark.parametrize(
    ("attribute", "value", "tag"),
    [
        ("StudyInstanceUID", "abc.123", "0020,000d"),
        ("SOPInstanceUID", "11|", "0008,0018"),
        ("SeriesInstanceUID", "1." + "2" * 64, "0020,000e"),
        ("SOPClassUID", "1.2.840.x", "0008,0016"),
    ],
)
def test_invalid_dataset_uid_is_409_with_43264(http, version, attribute, value, tag):
    ds = make_dataset()
    setattr(ds, attribute, value)
    response = store(http, version, to_bytes(ds))
    assert response.status_code == 409, response.text
    (item,) = failed_items(response.json())
    assert first(item, "00081197") == VALIDATION_FAILURE
    (comment,) = comments(item)
    assert comment.startswith(f"DICOM100: ({tag}) - ")
    assert "DICOM Identifier is invalid" in comment


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_required_uid_is_409(http, version, missing):
    ds = make_dataset(**{missing: None})
    response = store(http, version, to_bytes(ds))
    assert response.status_code == 409
    (item,) = failed_items(response.json())
    assert first(item, "00081197") == VALIDATION_FAILURE
    tag = pydicom.datadict.tag_for_keyword(missing)
    expected = f"({tag >> 16:04x},{tag & 0xFFFF:04x})"
    assert comments(item) == [f"DICOM100: {expected} - The required tag '{expected}' is missing."]


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "text", "no-file-meta", "dicomdir"])
def test_unreadable_bodies_are_409_with_43264(http, version, kind):
    if kind == "truncated":
        data = make_instance()[:200]
    elif kind == "random":
        data = random.Random(7).randbytes(4096)
    elif kind == "empty":
        data = b""
    elif kind == "text":
        data = b"DICM? no, just text"
    elif kind == "no-file-meta":
        data = Path(get_testdata_file("no_meta.dcm")).read_bytes()
    else:
        data = Path(get_testdata_file("DICOMDIR")).read_bytes()
    response = store(http, version, data)
    assert response.status_code == 409, response.text
    assert reasons(response.json()) == [VALIDATION_FAILURE]
    assert "00081199" not in response.json()


@pytest.mark.parametrize("cut", ["in-pixel-data", "in-pixel-data-header", "in-text-value", "encapsulated", "sr"])
def test_truncated_files_are_409_and_never_half_stored(http, version, cut):
    """pydicom reads a file cut short without complaint; the archive must not store the part it got."""
    if cut == "encapsulated":
        data = with_new_uids(Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes())[:-300]
        tag, text = "7fe0,0010", "fragment"
    elif cut == "sr":
        data = with_new_uids(Path(get_testdata_file("test-SR.dcm")).read_bytes())[:-30]
        tag, text = "0040,a730", "bytes long but the file holds only"
    else:
        full = to_bytes(make_dataset(SeriesDescription="S" * 40, frames=2))
        pixel = full.index(b"\xe0\x7f\x10\x00OW")
        if cut == "in-pixel-data":
            data, tag, text = full[:-100], "7fe0,0010", "The value is 1024 bytes long but the file holds only 924"
        elif cut == "in-pixel-data-header":
            data, tag, text = full[: pixel + 4], "0028,0103", "The file ends inside the header"
        else:
            data, tag, text = full[: full.index(b"S" * 40) + 10], "0008,103e", "40 bytes long"
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    response = store(http, version, data)
    assert response.status_code == 409, response.text
    (item,) = failed_items(response.json())
    assert first(item, "00081197") == VALIDATION_FAILURE
    (comment,) = comments(item)
    assert comment.startswith(f"DICOM100: ({tag}) - ")
    assert text in comment
    assert visible_count(http, ds.SOPInstanceUID) == 0


def test_unknown_transfer_syntax_is_409(http):
    ds = make_dataset(transfer_syntax="1.2.3.4.5.6")
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    response = store(http, "v2", buffer.getvalue())
    assert response.status_code == 409, response.text
    (item,) = failed_items(response.json())
    assert first(item, "00081197") == VALIDATION_FAILURE
    assert comments(item) == [
        "DICOM100: (0002,0010) - The transfer syntax '1.2.3.4.5.6' is not a known transfer syntax."
    ]


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_pydicom_truncated_files_are_rejected(http, name):
    response = store(http, "v2", with_new_uids(Path(get_testdata_file(name)).read_bytes()))
    assert response.status_code == 409, response.text
    assert reasons(response.json()) == [VALIDATION_FAILURE]


def test_empty_part_in_multipart_is_409(http):
    content_type, body = multipart([b""])
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 409
    assert reasons(response.json()) == [VALIDATION_FAILURE]


def test_invalid_part_next_to_valid_one_is_202(http):
    ds = make_dataset()
    response = store_parts(http, "v2", [b"garbage", to_bytes(ds)])
    assert response.status_code == 202
    body = response.json()
    assert reasons(body) == [VALIDATION_FAILURE]
    assert [first(i, "00081155") for i in referenced_items(body)] == [ds.SOPInstanceUID]


# -- v1 strict versus v2 lenient validation ----------------------------------------------------------------------
@pytest.mark.parametrize("patient_id", [None, ""])
def test_missing_or_empty_patient_id(http, version, patient_id):
    ds = make_dataset(PatientID=patient_id)
    response = store(http, version, to_bytes(ds))
    body = response.json()
    if version == "v1":
        assert response.status_code == 409
        (item,) = failed_items(body)
        assert first(item, "00081197") == VALIDATION_FAILURE
        assert comments(item) == [PATIENT_ID_MISSING]
        assert visible_count(http, ds.SOPInstanceUID) == 0
    else:
        assert response.status_code == 202, response.text
        (item,) = referenced_items(body)
        assert first(item, "00081196") == VALIDATION_WARNING
        assert comments(item) == [PATIENT_ID_MISSING]
        assert "00081198" not in body
        assert visible_count(http, ds.SOPInstanceUID) == 1


def test_missing_patient_id_does_not_overwrite_the_study_patient_id(http):
    study, patient_id = new_uid(), f"PID-{random.randrange(10**9)}"
    assert store(http, "v2", make_instance(study=study, PatientID=patient_id)).status_code == 200
    assert store(http, "v2", make_instance(study=study, PatientID=None)).status_code == 202
    found = http.get("/v2/studies", params={"PatientID": patient_id}, headers=ACCEPT)
    assert found.status_code == 200
    assert [r["0020000D"]["Value"][0] for r in found.json()] == [study]


def test_invalid_study_date(http, version):
    ds = make_dataset(StudyDate="20240102")
    ds[0x00080020] = raw_element(0x00080020, "DA", b"NotAValidStudyDate")
    data = to_bytes(ds)
    response = store(http, version, data)
    body = response.json()
    if version == "v1":
        assert response.status_code == 409, response.text
        (item,) = failed_items(body)
        assert first(item, "00081197") == VALIDATION_FAILURE
        (comment,) = comments(item)
        assert comment.startswith("DICOM100: (0008,0020) - ")
        return
    assert response.status_code == 202, response.text
    (item,) = referenced_items(body)
    assert first(item, "00081196") == VALIDATION_WARNING
    assert comments(item) == [
        'DICOM100: (0008,0020) - Content "NotAValidStudyDate" does not validate VR DA: '
        "one of the date values does not match the pattern YYYYMMDD"
    ]
    model = metadata(http, ds)
    assert "00080020" not in model, "an invalid attribute is dropped from the metadata"
    assert model["00100020"]["Value"] == [ds.PatientID]
    stored = pydicom.dcmread(io.BytesIO(fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)))
    assert stored.get_item(0x00080020).value == b"NotAValidStudyDate", "the file is kept as sent"
    found = http.get("/v2/studies", params={"StudyInstanceUID": ds.StudyInstanceUID}, headers=ACCEPT)
    assert found.status_code == 200
    assert "Value" not in found.json()[0].get("00080020", {}), "the invalid value is not indexed"


@pytest.mark.parametrize("date", ["20230230", "2023-01-01", "20230101-20230102", "2023"])
def test_study_date_must_be_a_real_yyyymmdd_date(http, date):
    ds = make_dataset()
    ds[0x00080020] = raw_element(0x00080020, "DA", date.encode().ljust(len(date) + len(date) % 2))
    response = store(http, "v1", to_bytes(ds))
    assert response.status_code == 409, response.text
    assert comments(failed_items(response.json())[0])[0].startswith("DICOM100: (0008,0020) - ")


def test_invalid_indexed_value_fails_v1_and_is_dropped_in_v2(http, version):
    """Modality longer than CS allows: v1 rejects, v2 stores it and drops it from metadata and index."""
    ds = make_dataset(Modality="OT")
    ds[0x00080060] = raw_element(0x00080060, "CS", b"ABCDEFGHIJKLMNOPQR")
    response = store(http, version, to_bytes(ds))
    if version == "v1":
        assert response.status_code == 409
        (item,) = failed_items(response.json())
        (comment,) = comments(item)
        assert comment.startswith("DICOM100: (0008,0060) - ")
        assert "ABCDEFGHIJKLMNOPQR" in comment
        return
    assert response.status_code == 202
    (item,) = referenced_items(response.json())
    assert first(item, "00081196") == VALIDATION_WARNING
    assert [c[:24] for c in comments(item)] == ["DICOM100: (0008,0060) - "]
    assert "00080060" not in metadata(http, ds)
    found = http.get("/v2/series", params={"SeriesInstanceUID": ds.SeriesInstanceUID}, headers=ACCEPT)
    assert found.status_code == 200
    assert "Value" not in found.json()[0].get("00080060", {})


def test_invalid_non_indexed_value_passes_v1_and_warns_in_v2(http, version):
    ds = make_dataset()
    ds[0x00200011] = raw_element(0x00200011, "IS", b"1A")  # SeriesNumber
    response = store(http, version, to_bytes(ds))
    (item,) = referenced_items(response.json())
    if version == "v1":
        assert response.status_code == 200, "v1 validates only indexed attributes"
        assert "00081196" not in item
    else:
        assert response.status_code == 202
        assert first(item, "00081196") == VALIDATION_WARNING
        (comment,) = comments(item)
        assert comment.startswith('DICOM100: (0020,0011) - Content "1A" does not validate VR IS')
        assert "00200011" not in metadata(http, ds)
    raw = fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert pydicom.dcmread(io.BytesIO(raw)).get_item(0x00200011).value == b"1A"


@pytest.mark.parametrize("case", ["unknown-vr", "odd-length-us", "unknown-vr-indexed"])
def test_undecodable_elements(http, version, case):
    """Elements pydicom cannot decode: v1 fails only indexed ones, v2 warns; neither gives a processing failure."""
    ds = make_dataset(SeriesDescription="QQQQ", Modality="MR")
    data = to_bytes(ds)
    if case == "unknown-vr":  # SeriesDescription (0008,103E) with the VR bytes "DD"
        tag, data = "0008,103e", data.replace(b"\x08\x00\x3e\x10LO\x04\x00QQQQ", b"\x08\x00\x3e\x10DD\x04\x00QQQQ")
    elif case == "odd-length-us":  # Rows (0028,0010) as 3 bytes: not a whole number of US values
        at = data.index(b"\x28\x00\x10\x00US\x02\x00")
        tag, data = (
            "0028,0010",
            data[:at] + b"\x28\x00\x10\x00US\x03\x00" + data[at + 8 : at + 10] + b"\x00" + data[at + 10 :],
        )
    else:  # Modality (0008,0060), an indexed attribute, with the VR bytes "DD"
        tag, data = "0008,0060", data.replace(b"\x08\x00\x60\x00CS\x02\x00MR", b"\x08\x00\x60\x00DD\x02\x00MR")
    assert data != to_bytes(ds)
    response = store(http, version, data)
    body = response.json()
    assert reasons(body) in ([], [VALIDATION_FAILURE]), body
    key = tag.replace(",", "").upper()
    if version == "v1" and case == "unknown-vr-indexed":
        assert response.status_code == 409
        (comment,) = comments(failed_items(body)[0])
        assert comment.startswith("DICOM100: (0008,0060) - Dicom element 'Modality' could not be decoded")
        return
    if version == "v1":
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 202, response.text
        (item,) = referenced_items(body)
        assert first(item, "00081196") == VALIDATION_WARNING
        (comment,) = comments(item)
        assert comment.startswith(f"DICOM100: ({tag}) - Dicom element '")
        assert "could not be decoded" in comment
    assert key not in metadata(http, ds)
    assert fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == data


def test_nul_padding(http, version):
    """Trailing NUL: invalid character in v1 (strict), padding in v2 (validates, indexed, searchable)."""
    patient_id = f"PID-{random.randrange(10**9)}"
    ds = make_dataset(PatientID=patient_id + "\0", Modality="CT\0")
    response = store(http, version, to_bytes(ds))
    if version == "v1":
        assert response.status_code == 409, response.text
        (item,) = failed_items(response.json())
        assert comments(item) == [
            "DICOM100: (0010,0020) - Dicom element 'PatientID' failed validation for VR 'LO': "
            "Value contains invalid character.",
            "DICOM100: (0008,0060) - Dicom element 'Modality' failed validation for VR 'CS': "
            "Value contains invalid character.",
        ]
        return
    assert response.status_code == 200, response.text
    (item,) = referenced_items(response.json())
    assert comments(item) == []
    for query in ("Modality=CT", "Modality=CT%00"):
        found = http.get(f"/v2/series?SeriesInstanceUID={ds.SeriesInstanceUID}&{query}", headers=ACCEPT)
        assert found.status_code == 200, query
    found = http.get("/v2/studies", params={"PatientID": patient_id}, headers=ACCEPT)
    assert [r["0020000D"]["Value"][0] for r in found.json()] == [ds.StudyInstanceUID]


def test_embedded_nul_in_v2_is_a_warning(http):
    ds = make_dataset(Modality="C\0T")
    response = store(http, "v2", to_bytes(ds))
    assert response.status_code == 202
    (item,) = referenced_items(response.json())
    assert first(item, "00081196") == VALIDATION_WARNING
    assert comments(item) == [
        "DICOM100: (0008,0060) - Dicom element 'Modality' failed validation for VR 'CS': "
        "Value contains invalid character."
    ]


def test_invalid_patient_id_fails_even_in_v2(http):
    ds = make_dataset(PatientID="P\x01ID")
    response = store(http, "v2", to_bytes(ds))
    assert response.status_code == 409
    (item,) = failed_items(response.json())
    assert comments(item) == [
        "DICOM100: (0010,0020) - Dicom element 'PatientID' failed validation for VR 'LO': "
        "Value contains invalid character."
    ]


def test_implicit_vr_file_gets_warning_45063(http, version):
    data, ds = implicit_vr_instance()
    response = store(http, version, data)
    assert response.status_code == (200 if version == "v1" else 202), response.text
    (item,) = referenced_items(response.json())
    assert first(item, "00081196") == IMPLICIT_VR_WARNING
    stored = fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert stored == bytes(128) + data[128:]


def test_implicit_vr_private_tag_is_kept_in_the_file_but_not_in_metadata(http):
    data, ds = implicit_vr_instance()
    block = ds.private_block(0x0009, "DICOMHUB TEST CREATOR", create=True)
    block.add_new(0x10, "LO", "private value")
    data = to_bytes(ds)
    response = store(http, "v2", data)
    assert response.status_code == 202, response.text
    model = metadata(http, ds)
    assert "00091010" not in model, "an implicit-VR private element has no known VR (UN): bulk data, left out"
    assert model["00080060"]["Value"] == ["MR"]
    stored = pydicom.dcmread(io.BytesIO(fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)))
    assert stored.get_item(0x00091010).value == b"private value "  # raw, padded to even length


@pytest.mark.parametrize(
    ("attribute", "values", "query"),
    [
        ("Modality", ["CT", "MR"], ("/v2/series", "Modality")),
        ("AccessionNumber", ["ACC1", "ACC2"], ("/v2/studies", "AccessionNumber")),
        ("ReferringPhysicianName", ["First^Doc", "Second^Doc"], ("/v2/studies", "ReferringPhysicianName")),
    ],
)
def test_multi_valued_indexed_attribute_warns_and_indexes_the_first(http, version, attribute, values, query):
    ds = make_dataset(**{attribute: values})
    response = store(http, version, to_bytes(ds))
    assert response.status_code == 200, response.text
    warning = response.headers.get("warning", "")
    assert warning.startswith("299 ")
    assert warning.endswith(MULTI_VALUE_WARNING)
    (item,) = referenced_items(response.json())
    assert "00081196" not in item
    resource, name = query
    found = http.get(resource, params={"StudyInstanceUID": ds.StudyInstanceUID, name: values[0]}, headers=ACCEPT)
    assert found.status_code == 200
    missed = http.get(resource, params={"StudyInstanceUID": ds.StudyInstanceUID, name: values[1]}, headers=ACCEPT)
    assert missed.status_code == 204


def test_single_valued_attributes_give_no_warning_header(http):
    response = store(http, "v2", make_instance(ImageType=["ORIGINAL", "PRIMARY"]))  # multi-valued, not indexed
    assert response.status_code == 200
    assert "warning" not in response.headers


# -- bytes kept as sent ----------------------------------------------------------------------------------------------
def test_preamble_is_zeroed_and_everything_else_kept(http):
    ds = make_dataset()
    sent = bytearray(to_bytes(ds))
    sent[:128] = b"II*\0" + bytes(range(124))  # e.g. a TIFF header in a dual-format file
    response = store(http, "v2", bytes(sent))
    assert response.status_code == 200, response.text
    stored = fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert len(stored) == len(sent)
    assert stored[:128] == bytes(128)
    assert stored[128:] == bytes(sent[128:])


@pytest.mark.parametrize("shape", list(RGB_SAMPLES))
def test_rgb_sample_files_round_trip_byte_for_byte(http, shape):
    """Azure's sample files (2.9 MB, odd-length pixel data padded to even), stored single part."""
    ds = make_rgb_sample(shape)
    data = to_bytes(ds)
    response = store(http, "v2", data)
    assert response.status_code == 200, response.text
    assert fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == data


def test_rgb_sample_files_in_one_multipart_request(http):
    """The three samples (one study, two series, about 8.7 MB) in one request, each kept byte for byte."""
    samples = make_rgb_samples()
    files = [to_bytes(ds) for ds in samples]
    response = store_parts(http, "v1", files)
    assert response.status_code == 200, response.text
    assert len(referenced_items(response.json())) == 3
    for ds, data in zip(samples, files, strict=True):
        assert fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == data


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "examples_ybr_color.dcm"])
def test_pydicom_files_round_trip_byte_for_byte(http, name):
    data = with_new_uids(Path(get_testdata_file(name)).read_bytes())
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    response = store(http, "v2", data)
    assert response.status_code in (200, 202), response.text
    # some of these carry a TIFF header in their preamble: the archive zeroes it and keeps every other byte
    assert fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == bytes(128) + data[128:]


def test_chunked_request_bodies(http):
    single, part = make_dataset(), make_dataset()
    data = to_bytes(single)

    def chunks(blob: bytes, size: int):
        for i in range(0, len(blob), size):
            yield blob[i : i + size]

    response = http.post("/v2/studies", content=chunks(data, 97), headers=SINGLE)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 200, response.text
    content_type, body = multipart([to_bytes(part)])
    response = http.post("/v2/studies", content=chunks(body, 13), headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert fetch(http, single.StudyInstanceUID, single.SeriesInstanceUID, single.SOPInstanceUID) == data
    assert fetch(http, part.StudyInstanceUID, part.SeriesInstanceUID, part.SOPInstanceUID) == to_bytes(part)


def _peak_rss_mb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return int(fields["VmHWM"].split()[0]) // 1024


def test_large_instance_streams_through_multipart(server, http):
    """A 64 MB part is spooled to disk: the server's peak memory grows far less than the part."""
    ds = make_dataset(rows=4096, columns=8192)
    data = to_bytes(ds)
    assert len(data) > 64_000_000
    content_type, body = multipart([data])
    peak_before = _peak_rss_mb(server.process.pid)

    def chunks():
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    response = http.post("/v2/studies", content=chunks(), headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    peak_after = _peak_rss_mb(server.process.pid)
    if peak_before is not None:
        assert peak_after - peak_before < 32, f"peak RSS grew from {peak_before} MB to {peak_after} MB"
    with http.stream(
        "GET", instance_path("v2", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID), headers=ANY_SYNTAX
    ) as fetched:
        assert fetched.status_code == 200
        assert b"".join(fetched.iter_bytes()) == data


# -- concurrency -----------------------------------------------------------------------------------------------------
def test_concurrent_stores_of_the_same_instance_make_one_instance(server, http):
    data = make_instance()
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    barrier = threading.Barrier(8)

    def post(_: int) -> tuple[int, list[int]]:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            barrier.wait()
            response = client.post("/v2/studies", content=data, headers=SINGLE)
            return response.status_code, reasons(response.json())

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(post, range(8)))
    assert sorted(status for status, _ in outcomes) == [200] + [409] * 7, outcomes
    for status, codes in outcomes:
        if status == 409:
            assert len(codes) == 1 and codes[0] in (INSTANCE_EXISTS, INSTANCE_BEING_CREATED), outcomes
    assert visible_count(http, ds.SOPInstanceUID) == 1
    assert fetch(http, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == data


def test_concurrent_stores_of_different_instances_in_one_study(server, http):
    study, series = new_uid(), new_uid()
    files = [make_instance(study=study, series=series) for _ in range(12)]

    def post(data: bytes) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post("/v2/studies", content=data, headers=SINGLE).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(post, files)) == [200] * 12
    found = http.get(f"/v2/studies/{study}/instances", headers=ACCEPT)
    assert len(found.json()) == 12


# -- size limit ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory):
    """A server whose STOW accepts files and parts of at most 200 kB (SQLite: the limit is engine-independent)."""
    srv = Server(tmp_path_factory.mktemp("dicomhub-limit"), max_file_size=str(200_000)).start()
    yield srv
    srv.stop()


def test_files_and_parts_over_the_limit_are_413(small_limit_server):
    big, small = make_dataset(rows=256, columns=512), make_dataset()
    big_bytes = to_bytes(big)
    assert len(big_bytes) > 200_000

    def chunked(blob: bytes):
        for i in range(0, len(blob), 8192):
            yield blob[i : i + 8192]

    with httpx.Client(base_url=small_limit_server.url, timeout=60) as client:
        # declared too large (Content-Length), found too large while streaming (chunked), a multipart part too large
        for body in (big_bytes, chunked(big_bytes)):
            response = client.post("/v2/studies", content=body, headers=SINGLE)
            assert response.status_code == 413
            assert response.text == "The request body is larger than the limit of 200000 bytes."
        content_type, body = multipart([to_bytes(small), big_bytes])
        response = client.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
        assert response.status_code == 413
        assert response.text == "A part of the request is larger than the limit of 200000 bytes."
        # nothing of those requests was stored, and the server still works
        assert visible_count(client, big.SOPInstanceUID) == 0
        assert visible_count(client, small.SOPInstanceUID) == 0
        assert client.post("/v2/studies", content=to_bytes(small), headers=SINGLE).status_code == 200
        assert visible_count(client, small.SOPInstanceUID) == 1
    staging = small_limit_server.data_dir / "blobs" / ".staging"
    assert not any(staging.glob("*.part")), "spooled parts of rejected requests are removed"
