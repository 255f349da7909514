"""WADO-RS retrieve of studies, series and instances: multipart and single part, Accept negotiation (Azure's rules
plus tolerant parsing), transcoding between the uncompressed transfer syntaxes and the transcoding size limit.

The helpers at the top (store, re-UID, multipart parsing) are shared with test_frames / test_metadata / test_delete.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.factory import make_dataset, make_rgb_samples, multipart, new_uid, to_bytes
from tests.servers import Server

IMPLICIT = str(ImplicitVRLittleEndian)
EXPLICIT = str(ExplicitVRLittleEndian)
BIG = str(ExplicitVRBigEndian)
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
MPEG2 = "1.2.840.10008.1.2.4.100"
UNCOMPRESSED = [IMPLICIT, EXPLICIT, BIG]
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
TOO_LARGE = (
    "Requested DICOM instance size is above the supported limit of {limit}. The entire instance can be retrieved "
    "with the original transfer syntax by specifying 'transfer-syntax=*' in the Accept header."
)
MULTI_DICOM = 'multipart/related; type="application/dicom"'


# -- shared helpers ------------------------------------------------------------------------------------------------
def pydicom_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not bundled"
    return path


@dataclass
class Stored:
    """One instance as sent to the server: its UIDs, its stored bytes and the dataset they decode to."""

    study: str
    series: str
    sop: str
    data: bytes
    ds: Dataset

    @property
    def transfer_syntax(self) -> str:
        return str(self.ds.file_meta.TransferSyntaxUID)

    def path(self, version: str = "v2") -> str:
        return f"/{version}/studies/{self.study}/series/{self.series}/instances/{self.sop}"


def stored(ds: Dataset) -> Stored:
    """Encodes ``ds`` in its own transfer syntax, with a zero preamble (the server zeroes preambles)."""
    ds.preamble = bytes(128)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return Stored(
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        data,
        pydicom.dcmread(io.BytesIO(data)),
    )


def reuid(source: str | Path, study: str | None = None, series: str | None = None, **attributes) -> Stored:
    """A copy of a DICOM file with fresh (or given) UIDs; everything else, pixel data included, unchanged."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study or new_uid()
    ds.SeriesInstanceUID = series or new_uid()
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attributes.items():
        setattr(ds, key, value)
    return stored(ds)


def generated(study: str | None = None, series: str | None = None, **kwargs) -> Stored:
    ds = make_dataset(study=study, series=series, **kwargs)
    data = to_bytes(ds)
    return Stored(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, data, pydicom.dcmread(io.BytesIO(data)))


def store(http: httpx.Client, *instances: Stored, version: str = "v2") -> None:
    """STOWs the instances in one multipart request and checks that every one was stored."""
    content_type, body = multipart([i.data for i in instances])
    response = http.post(
        f"/{version}/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )
    assert response.status_code in (200, 202), response.text
    result = response.json()
    assert "00081198" not in result, result  # FailedSOPSequence
    referenced = {item["00081155"]["Value"][0] for item in result["00081199"]["Value"]}
    assert referenced == {i.sop for i in instances}


def split_media_type(value: str) -> tuple[str, dict[str, str]]:
    base, *params = (p.strip() for p in value.split(";"))
    parsed = {}
    for param in params:
        name, _, val = param.partition("=")
        parsed[name.strip().lower()] = val.strip().strip('"')
    return base.lower(), parsed


def assert_media(content_type: str, media: str, transfer_syntax: str) -> None:
    base, params = split_media_type(content_type)
    assert base == media, content_type
    assert params.get("transfer-syntax") == transfer_syntax, content_type


@dataclass
class BodyPart:
    content_type: str
    data: bytes


def parse_multipart(response: httpx.Response) -> list[BodyPart]:
    """Strict RFC 2046 parse of a multipart/related response body."""
    media, params = split_media_type(response.headers["content-type"])
    assert media == "multipart/related", response.headers["content-type"]
    boundary = params["boundary"].encode()
    body = response.content
    assert body.startswith(b"--" + boundary + b"\r\n"), body[:100]
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary)
    assert sections[0] == b""
    assert sections[-1] in (b"--", b"--\r\n"), sections[-1][:100]
    parts = []
    for section in sections[1:-1]:
        assert section.startswith(b"\r\n")
        head, separator, data = section[2:].partition(b"\r\n\r\n")
        assert separator, section[:200]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append(BodyPart(headers.get("content-type", ""), data))
    return parts


def get_without_accept(http: httpx.Client, path: str) -> httpx.Response:
    request = http.build_request("GET", path)
    del request.headers["Accept"]
    return http.send(request)


def sop_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def assert_same_attributes(got: Dataset, sent: Dataset) -> None:
    """Same elements with the same values; binary values (whose byte order may change) are not compared."""
    assert {int(e.tag) for e in got} == {int(e.tag) for e in sent}
    for elem in sent:
        if elem.VR in BULK_VRS:
            continue
        assert got[elem.tag].value == elem.value, elem


# -- fixtures ------------------------------------------------------------------------------------------------------
@dataclass
class StudyFixture:
    study: str
    series_a: str
    series_b: str
    instances: list[Stored]

    def in_series(self, series: str) -> list[Stored]:
        return [i for i in self.instances if i.series == series]


@pytest.fixture(scope="module")
def study(server: Server) -> StudyFixture:
    """One study, 3 instances in 2 series, in three transfer syntaxes: explicit LE, implicit LE, big endian."""
    study_uid, series_a, series_b = new_uid(), new_uid(), new_uid()
    instances = [
        generated(study_uid, series_a, PatientName="Wado^Study"),
        generated(study_uid, series_a, transfer_syntax=IMPLICIT, PatientName="Wado^Study"),
        reuid(pydicom_file("MR_small_bigendian.dcm"), study_uid, series_b),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        store(client, *instances)
    return StudyFixture(study_uid, series_a, series_b, instances)


@pytest.fixture
def dicomweb(server: Server) -> DICOMwebClient:
    return DICOMwebClient(url=f"{server.url}/v2")


# -- multipart retrieve as stored ----------------------------------------------------------------------------------
@pytest.mark.parametrize("accept", [f"{MULTI_DICOM}; transfer-syntax=*", "*/*"])
def test_study_multipart_returns_every_instance_as_stored(http, study, accept):
    response = http.get(f"/v2/studies/{study.study}", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    parts = parse_multipart(response)
    assert len(parts) == 3
    expected = {i.sop: i for i in study.instances}
    for part in parts:
        inst = expected.pop(sop_of(part.data))
        assert_media(part.content_type, "application/dicom", inst.transfer_syntax)
        assert part.data == inst.data
    assert not expected
    # stored files of known sizes: the length is announced, not chunked
    assert "transfer-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(response.content)


def test_series_multipart_returns_only_that_series(http, study):
    for series in (study.series_a, study.series_b):
        response = http.get(
            f"/v2/studies/{study.study}/series/{series}", headers={"Accept": f"{MULTI_DICOM}; transfer-syntax=*"}
        )
        assert response.status_code == 200, response.text
        parts = parse_multipart(response)
        wanted = {i.sop: i for i in study.in_series(series)}
        assert sorted(sop_of(p.data) for p in parts) == sorted(wanted)
        for part in parts:
            inst = wanted[sop_of(part.data)]
            assert part.data == inst.data
            assert_media(part.content_type, "application/dicom", inst.transfer_syntax)


def test_instance_multipart_original_for_each_syntax(http, study):
    for inst in study.instances:
        response = http.get(inst.path(), headers={"Accept": f"{MULTI_DICOM}; transfer-syntax=*"})
        assert response.status_code == 200, response.text
        [part] = parse_multipart(response)
        assert_media(part.content_type, "application/dicom", inst.transfer_syntax)
        assert part.data == inst.data


def test_retrieve_with_dicomweb_client(dicomweb, study):
    datasets = dicomweb.retrieve_study(study.study, media_types=(("application/dicom", "*"),))
    by_sop = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert set(by_sop) == {i.sop for i in study.instances}
    for inst in study.instances:
        assert by_sop[inst.sop].PixelData == inst.ds.PixelData
        assert by_sop[inst.sop].file_meta.TransferSyntaxUID == inst.transfer_syntax

    series = dicomweb.retrieve_series(study.study, study.series_b, media_types=(("application/dicom", "*"),))
    assert [str(ds.SOPInstanceUID) for ds in series] == [study.in_series(study.series_b)[0].sop]

    explicit = study.instances[0]
    ds = dicomweb.retrieve_instance(explicit.study, explicit.series, explicit.sop)  # default: explicit VR LE
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    assert ds.PixelData == explicit.ds.PixelData
    assert ds.PatientName == "Wado^Study"


def test_single_part_instance_default_is_explicit_little_endian(http, study):
    explicit, implicit, big = study.instances
    response = http.get(explicit.path(), headers={"Accept": "application/dicom"})
    assert response.status_code == 200, response.text
    assert_media(response.headers["content-type"], "application/dicom", EXPLICIT)
    assert response.content == explicit.data  # already explicit LE: the stored bytes, untouched
    assert response.headers.get("content-length") == str(len(explicit.data))

    for source in (implicit, big):
        response = http.get(source.path(), headers={"Accept": "application/dicom"})
        assert response.status_code == 200, response.text
        assert_media(response.headers["content-type"], "application/dicom", EXPLICIT)
        got = pydicom.dcmread(io.BytesIO(response.content))
        assert response.content[128:132] == b"DICM"
        assert got.file_meta.TransferSyntaxUID == EXPLICIT
        assert np.array_equal(got.pixel_array, source.ds.pixel_array)
        assert_same_attributes(got, source.ds)


def test_single_part_instance_original(http, study):
    for inst in study.instances:
        response = http.get(inst.path(), headers={"Accept": "application/dicom; transfer-syntax=*"})
        assert response.status_code == 200, response.text
        assert_media(response.headers["content-type"], "application/dicom", inst.transfer_syntax)
        assert response.content == inst.data


def test_v1_routes_serve_the_same_bytes(http, study):
    inst = study.instances[1]
    response = http.get(inst.path("v1"), headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert response.status_code == 200
    assert response.content == inst.data


# -- Accept negotiation ----------------------------------------------------------------------------------------------
REJECTED_FOR_STUDY = [
    MULTI_DICOM,  # default transfer syntax 1.2.1 is refused when several instances match
    f"{MULTI_DICOM}; transfer-syntax={EXPLICIT}",
    "application/dicom",
    "application/dicom; transfer-syntax=*",
    'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    "application/dicom+json",
    "image/jpeg",
    f"{MULTI_DICOM}; transfer-syntax={MPEG2}",
    f"{MULTI_DICOM}; transfer-syntax=garbage",
    f"{MULTI_DICOM}; transfer-syntax=*; q=0",
]


@pytest.mark.parametrize("accept", REJECTED_FOR_STUDY)
def test_study_not_acceptable(http, study, accept):
    for path in (f"/v2/studies/{study.study}", f"/v2/studies/{study.study}/series/{study.series_a}"):
        response = http.get(path, headers={"Accept": accept})
        assert response.status_code == 406, (path, accept, response.status_code)


def test_study_default_syntax_refusal_names_the_rule(http, study):
    response = http.get(f"/v2/studies/{study.study}", headers={"Accept": MULTI_DICOM})
    assert response.status_code == 406
    assert "multiple instances" in response.text
    assert "transfer-syntax=*" in response.text


REJECTED_FOR_INSTANCE = [
    "application/octet-stream",
    'multipart/related; type="application/octet-stream"',
    f"application/dicom; transfer-syntax={MPEG2}",
    f"{MULTI_DICOM}; transfer-syntax={MPEG2}",
    "application/dicom; transfer-syntax=garbage",
    f"{MULTI_DICOM}; transfer-syntax=1.2.3.4",
    "image/jpeg",
    "image/jp2",
    "text/html, application/xml",
    "application/dicom; q=0",
]


@pytest.mark.parametrize("accept", REJECTED_FOR_INSTANCE)
def test_instance_not_acceptable(http, study, accept):
    response = http.get(study.instances[0].path(), headers={"Accept": accept})
    assert response.status_code == 406, (accept, response.status_code)


def test_several_accept_header_lines_are_one_list(http, study):
    inst = study.instances[0]
    headers = [("Accept", "image/jpeg"), ("Accept", "application/dicom; transfer-syntax=*")]
    response = http.get(inst.path(), headers=headers)
    assert response.status_code == 200
    assert response.content == inst.data
    response = http.get(f"{inst.path()}/frames/1", headers=[("Accept", "image/jpeg"), ("Accept", "*/*")])
    assert response.status_code == 200
    response = http.get(f"{inst.path()}/metadata", headers=[("Accept", "image/jpeg"), ("Accept", "*/*")])
    assert response.status_code == 200


def test_no_accept_header_is_not_acceptable(http, study):
    for path in (f"/v2/studies/{study.study}", study.instances[0].path()):
        response = get_without_accept(http, path)
        assert response.status_code == 406, path


# (Accept, expected multipart?, expected transfer syntax; None = as stored) for the implicit VR LE instance
TOLERATED_FOR_INSTANCE = [
    ("multipart/related; type=application/dicom; transfer-syntax=*", True, None),
    ('multipart/related; type="application/dicom"; transfer-syntax="*"', True, None),
    (f'multipart/related; type="application/dicom"; transfer-syntax="{EXPLICIT}"', True, EXPLICIT),
    ("multipart/related; type=application/dicom", True, EXPLICIT),
    ('Multipart/Related; Type="Application/DICOM"; Transfer-Syntax=*', True, None),
    ('multipart/related ; type = "application/dicom" ; transfer-syntax = *', True, None),
    (f'application/dicom; transfer-syntax="{EXPLICIT}"', False, EXPLICIT),
    ("application/dicom;transfer-syntax=*", False, None),
    ("*/*", True, None),
    ("*/*; q=0.1", True, None),
    (f"*/*; transfer-syntax={EXPLICIT}", True, EXPLICIT),
    # q-values: the best acceptable range wins, unacceptable ones are skipped whatever their q
    ("application/octet-stream; q=1, application/dicom; q=0.5", False, EXPLICIT),
    (f"{MULTI_DICOM}; transfer-syntax={MPEG2}, application/dicom; transfer-syntax=*; q=0.2", False, None),
    ("application/dicom; q=0.4, multipart/related; type=application/dicom; transfer-syntax=*; q=0.9", True, None),
    ("image/jpeg, text/plain;q=0.9, */*;q=0.1", True, None),
    (f"{MULTI_DICOM}; transfer-syntax=*, */*;q=0.5", True, None),
    (f"application/dicom; transfer-syntax={EXPLICIT}; q=0.3, application/dicom; transfer-syntax=*; q=0.7", False, None),
]


@pytest.mark.parametrize(("accept", "is_multipart", "syntax"), TOLERATED_FOR_INSTANCE)
def test_instance_tolerant_accept(http, study, accept, is_multipart, syntax):
    inst = study.instances[1]  # implicit VR little endian
    response = http.get(inst.path(), headers={"Accept": accept})
    assert response.status_code == 200, (accept, response.status_code, response.text)
    if is_multipart:
        [part] = parse_multipart(response)
        content_type, data = part.content_type, part.data
    else:
        content_type, data = response.headers["content-type"], response.content
        assert split_media_type(content_type)[0] == "application/dicom"
    assert_media(content_type, "application/dicom", syntax or inst.transfer_syntax)
    if syntax in (None, inst.transfer_syntax):
        assert data == inst.data
    else:
        got = pydicom.dcmread(io.BytesIO(data))
        assert got.file_meta.TransferSyntaxUID == syntax
        assert got.PixelData == inst.ds.PixelData


TOLERATED_FOR_STUDY = [
    f"{MULTI_DICOM}; transfer-syntax=*, */*;q=0.5",
    "multipart/related; type=application/dicom; transfer-syntax=*",
    'multipart/related; type="application/dicom"; transfer-syntax="*"',
    "application/dicom, image/jpeg;q=0.9, */*;q=0.2",
    "application/dicom, multipart/related; type=application/dicom; transfer-syntax=*; q=0.5",
    # Azure: a later acceptable range asking for transfer-syntax=* wins over an earlier one with the same q
    f"{MULTI_DICOM}, {MULTI_DICOM}; transfer-syntax=*",
]


@pytest.mark.parametrize("accept", TOLERATED_FOR_STUDY)
def test_study_tolerant_accept(http, study, accept):
    response = http.get(f"/v2/studies/{study.study}", headers={"Accept": accept})
    assert response.status_code == 200, (accept, response.status_code, response.text)
    parts = parse_multipart(response)
    assert sorted(p.data for p in parts) == sorted(i.data for i in study.instances)


# -- transcoding between the uncompressed syntaxes -------------------------------------------------------------------
MR_SOURCES = {IMPLICIT: "MR_small_implicit.dcm", EXPLICIT: "MR_small.dcm", BIG: "MR_small_bigendian.dcm"}


@pytest.fixture(scope="module")
def mr_family(server: Server) -> dict[str, Stored]:
    """MR_small in its three uncompressed encodings, each re-UIDed into its own study."""
    family = {ts: reuid(pydicom_file(name)) for ts, name in MR_SOURCES.items()}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        store(client, *family.values())
    return family


@pytest.mark.parametrize("target", UNCOMPRESSED)
@pytest.mark.parametrize("source", UNCOMPRESSED)
def test_transcode_uncompressed(http, mr_family, source, target):
    inst = mr_family[source]
    reference = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    response = http.get(inst.path(), headers={"Accept": f"application/dicom; transfer-syntax={target}"})
    assert response.status_code == 200, response.text
    assert_media(response.headers["content-type"], "application/dicom", target)
    if source == target:
        assert response.content == inst.data
    got = pydicom.dcmread(io.BytesIO(response.content))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.file_meta.MediaStorageSOPInstanceUID == inst.sop
    assert np.array_equal(got.pixel_array, reference.pixel_array)
    assert_same_attributes(got, inst.ds)

    multi = http.get(inst.path(), headers={"Accept": f"{MULTI_DICOM}; transfer-syntax={target}"})
    assert multi.status_code == 200, multi.text
    [part] = parse_multipart(multi)
    assert_media(part.content_type, "application/dicom", target)
    assert part.data == response.content


@pytest.mark.parametrize(
    ("name", "twin"),
    [
        ("rtdose.dcm", None),  # 32-bit native, implicit VR, 15 frames
        ("SC_rgb_small_odd.dcm", None),  # 8-bit RGB in OW, odd length
        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),  # 8-bit OW big endian: bytes swapped pairwise
        ("CT_small.dcm", None),
    ],
)
def test_transcode_round_trip_keeps_pixels(http, name, twin):
    """Every uncompressed syntax, then back: pixels decode as the source's (or its little-endian twin's)."""
    inst = reuid(pydicom_file(name))
    store(http, inst)
    reference = pydicom.dcmread(pydicom_file(twin or name)).pixel_array
    for target in UNCOMPRESSED:
        response = http.get(inst.path(), headers={"Accept": f"application/dicom; transfer-syntax={target}"})
        assert response.status_code == 200, response.text
        got = pydicom.dcmread(io.BytesIO(response.content))
        assert got.file_meta.TransferSyntaxUID == target
        assert np.array_equal(got.pixel_array, reference), (name, target)


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("rtdose.dcm", J2K_LOSSLESS),  # 32-bit pixels: no JPEG 2000 encoder takes them
        ("liver_1frame.dcm", "1.2.840.10008.1.2.5"),  # 1-bit pixels: RLE encoders take 8 and 16 bits
        ("MR_small.dcm", "1.2.840.10008.1.2.4.201"),  # HTJ2K: no encoder in the codec libraries
        ("CT_small.dcm", JPEG_BASELINE),  # 16-bit pixels: JPEG baseline is 8-bit
    ],
)
def test_transcoding_not_acceptable_but_original_is(http, name, target):
    inst = reuid(pydicom_file(name))
    store(http, inst)
    for accept in (f"application/dicom; transfer-syntax={target}", f"{MULTI_DICOM}; transfer-syntax={target}"):
        response = http.get(inst.path(), headers={"Accept": accept})
        assert response.status_code == 406, (accept, response.status_code)
        assert f"cannot be transcoded from '{inst.transfer_syntax}' to '{target}'" in response.text
    response = http.get(inst.path(), headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert response.status_code == 200
    assert_media(response.headers["content-type"], "application/dicom", inst.transfer_syntax)
    assert response.content == inst.data
    [part] = parse_multipart(http.get(f"/v2/studies/{inst.study}", headers={"Accept": "*/*"}))
    assert part.data == inst.data


def test_stored_syntax_requested_explicitly_needs_no_transcoding(http):
    inst = reuid(pydicom_file("MR_small_jp2klossless.dcm"))
    store(http, inst)
    response = http.get(inst.path(), headers={"Accept": f"application/dicom; transfer-syntax={J2K_LOSSLESS}"})
    assert response.status_code == 200
    assert_media(response.headers["content-type"], "application/dicom", J2K_LOSSLESS)
    assert response.content == inst.data


def test_mixed_syntax_study_needs_original(http):
    """Azure: with several instances any syntax but * is refused, even one every instance already has."""
    study_uid = new_uid()
    a, b = generated(study_uid), generated(study_uid)
    store(http, a, b)
    response = http.get(f"/v2/studies/{study_uid}", headers={"Accept": f"{MULTI_DICOM}; transfer-syntax={EXPLICIT}"})
    assert response.status_code == 406
    single = generated()
    store(http, single)
    response = http.get(f"/v2/studies/{single.study}", headers={"Accept": MULTI_DICOM})
    assert response.status_code == 200  # one instance: the default syntax is fine
    [part] = parse_multipart(response)
    assert_media(part.content_type, "application/dicom", EXPLICIT)
    assert part.data == single.data


# -- not found / invalid ---------------------------------------------------------------------------------------------
def test_not_found_per_level(http, study):
    accept = {"Accept": f"{MULTI_DICOM}; transfer-syntax=*"}
    cases = [
        (f"/v2/studies/{new_uid()}", "The specified study cannot be found."),
        (f"/v2/studies/{study.study}/series/{new_uid()}", "The specified series cannot be found."),
        (f"/v2/studies/{study.study}/series/{study.series_a}/instances/{new_uid()}", "instance cannot be found"),
        (f"/v2/studies/{study.study}/series/{study.series_b}/instances/{study.instances[0].sop}", "instance"),
    ]
    for path, message in cases:
        response = http.get(path, headers=accept)
        assert response.status_code == 404, path
        assert message in response.text


@pytest.mark.parametrize("bad", ["notAStudyInstanceUid", "1.2.abc", "1." + "2" * 64, "1.2.3.", "1.2-3"])
def test_invalid_uids_are_bad_requests(http, study, bad):
    accept = {"Accept": f"{MULTI_DICOM}; transfer-syntax=*"}
    sop = study.instances[0].sop
    for path in (
        f"/v2/studies/{bad}",
        f"/v2/studies/{study.study}/series/{bad}",
        f"/v2/studies/{study.study}/series/{study.series_a}/instances/{bad}",
        f"/v2/studies/{bad}/series/{study.series_a}/instances/{sop}",
    ):
        response = http.get(path, headers=accept)
        assert response.status_code == 400, (path, response.status_code)
        assert "invalid" in response.text.lower()


def test_padded_uid_in_path_matches(http, study):
    inst = study.instances[0]
    response = http.get(
        f"/v2/studies/{inst.study}%20/series/{inst.series}/instances/{inst.sop}",
        headers={"Accept": "application/dicom; transfer-syntax=*"},
    )
    assert response.status_code == 200
    assert response.content == inst.data


# -- files like the Azure samples (RGB, 2.9 MB each) ------------------------------------------------------------------
def test_azure_samples_round_trip(http):
    samples = [stored(ds) for ds in make_rgb_samples()]
    store(http, *samples)
    response = http.get(f"/v2/studies/{samples[0].study}", headers={"Accept": "*/*"})
    assert response.status_code == 200
    parts = parse_multipart(response)
    assert sorted(p.data for p in parts) == sorted(s.data for s in samples)
    for part in parts:
        assert_media(part.content_type, "application/dicom", EXPLICIT)


# -- transcoding size limit (a dedicated server; the rule does not depend on the index engine) ----------------------
@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("dicomhub-limit"), max_transcode_size="1000").start()
    yield srv
    srv.stop()


def test_transcoding_above_size_limit_is_not_acceptable(small_limit_server):
    with httpx.Client(base_url=small_limit_server.url, timeout=60) as http:
        implicit = reuid(pydicom_file("MR_small_implicit.dcm"))
        big = reuid(pydicom_file("MR_small_bigendian.dcm"))
        explicit = reuid(pydicom_file("MR_small.dcm"))
        store(http, implicit, big, explicit)
        message = TOO_LARGE.format(limit=1000)
        for accept in ("application/dicom", f"{MULTI_DICOM}; transfer-syntax={EXPLICIT}", MULTI_DICOM):
            response = http.get(implicit.path(), headers={"Accept": accept})
            assert response.status_code == 406, accept
            assert response.text == message
        # no transcoding needed: served whatever the size
        for inst, accept in (
            (implicit, "application/dicom; transfer-syntax=*"),
            (implicit, f"application/dicom; transfer-syntax={IMPLICIT}"),
            (explicit, "application/dicom"),
        ):
            response = http.get(inst.path(), headers={"Accept": accept})
            assert response.status_code == 200, accept
            assert response.content == inst.data
        # frames: byte ranges need no parsing; big endian to little endian does
        frames = "/frames/1"
        response = http.get(implicit.path() + frames, headers={"Accept": "application/octet-stream"})
        assert response.status_code == 200
        assert response.content == implicit.ds.PixelData
        response = http.get(big.path() + frames, headers={"Accept": "application/octet-stream"})
        assert response.status_code == 406
        assert response.text == message
        response = http.get(big.path() + frames, headers={"Accept": "application/octet-stream; transfer-syntax=*"})
        assert response.status_code == 200
        assert response.content == big.ds.PixelData
