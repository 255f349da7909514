"""Damaged DICOM files (issue 8 §2 items 6-10): a file is either refused at store time with 43264 and a reason, or
stored and then answered on every pixel retrieve with a 4xx that names the problem; never a 5xx, never 272 for
something wrong with the uploaded bytes, never a worker taken down."""

from __future__ import annotations

import struct
import time
import zlib

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from tests.damaged import (
    SINGLE,
    UNDEFINED,
    VALIDATION_FAILURE,
    assert_4xx_message,
    element,
    failure,
    item,
    nested_sequences,
    rss_kib,
    sequence,
    splice,
    stored_urls,
)
from tests.factory import make_dataset, to_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ACCEPT = {"Accept": "application/dicom+json"}
NUMBER_OF_FRAMES, ROWS, COLUMNS, SAMPLES, BITS = 0x00280008, 0x00280010, 0x00280011, 0x00280002, 0x00280100
PIXEL_RETRIEVES = {
    "frame": ("/frames/1", "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"),
    "frame as JPEG 2000": ("/frames/1", "multipart/related; type=image/jp2"),
    "rendered": ("/rendered", "image/jpeg"),
    "thumbnail": ("/thumbnail", "image/png"),
    "transcoded": ("", "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90"),
}


def _is(text: str) -> bytes:
    return text.encode() + b" " * (len(text) % 2)


DAMAGED_ATTRIBUTES = {
    "frames abc": (NUMBER_OF_FRAMES, element(NUMBER_OF_FRAMES, b"IS", _is("abc")), "NumberOfFrames 'abc'"),
    "frames 30\\2": (NUMBER_OF_FRAMES, element(NUMBER_OF_FRAMES, b"IS", _is("30\\2")), "NumberOfFrames '30\\2'"),
    "frames nan": (NUMBER_OF_FRAMES, element(NUMBER_OF_FRAMES, b"IS", _is("nan")), "NumberOfFrames 'nan'"),
    "frames -1": (NUMBER_OF_FRAMES, element(NUMBER_OF_FRAMES, b"IS", _is("-1")), "NumberOfFrames '-1'"),
    "frames 0": (NUMBER_OF_FRAMES, element(NUMBER_OF_FRAMES, b"IS", _is("0")), "NumberOfFrames '0'"),
    "frames beyond 32 bits": (
        NUMBER_OF_FRAMES,
        element(NUMBER_OF_FRAMES, b"IS", _is("99999999999")),
        "NumberOfFrames '99999999999'",
    ),
    "rows of unknown VR": (ROWS, element(ROWS, b"ZZ", b"\x10\x00"), "Rows cannot be read"),
    "rows as text": (ROWS, element(ROWS, b"LO", b"abc "), "Rows 'abc'"),
    "rows zero": (ROWS, element(ROWS, b"US", b"\0\0"), "Rows '0'"),
    "columns missing": (COLUMNS, b"", "Columns is missing"),
    "columns absurd": (COLUMNS, element(COLUMNS, b"UL", struct.pack("<I", 70000)), "Columns '70000'"),
    "bits allocated FD of 2 bytes": (BITS, element(BITS, b"FD", b"\x10\x00"), "BitsAllocated cannot be read"),
    "bits allocated FD": (BITS, element(BITS, b"FD", struct.pack("<d", 16.0)), "BitsAllocated '16.0'"),
    "bits allocated 12": (BITS, element(BITS, b"US", b"\x0c\x00"), "BitsAllocated 12"),
    "bits allocated missing": (BITS, b"", "BitsAllocated is missing"),
    "samples zero": (SAMPLES, element(SAMPLES, b"US", b"\0\0"), "SamplesPerPixel '0'"),
    "samples absurd": (SAMPLES, element(SAMPLES, b"US", b"\xff\xff"), "SamplesPerPixel '65535'"),
    "samples of unknown VR": (SAMPLES, element(SAMPLES, b"ZZ", b"\x01\x00"), "SamplesPerPixel cannot be read"),
}


@pytest.mark.parametrize("case", DAMAGED_ATTRIBUTES)
def test_damaged_image_attributes_are_stored_and_their_pixels_are_406_naming_them(http, case):
    """Azure keeps such files (v2 warns); every retrieve that reads their pixels says which attribute is wrong."""
    tag, raw, reason = DAMAGED_ATTRIBUTES[case]
    data = splice(make_dataset(frames=2), tag, raw)
    response = http.post("/v2/studies", content=data, headers=SINGLE)
    assert response.status_code in (200, 202), response.text
    (url,) = stored_urls(response)
    assert http.get(url + "/metadata", headers=ACCEPT).status_code == 200
    stored = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert stored.status_code == 200 and stored.content[128:] == data[128:]
    for name, (path, accept) in PIXEL_RETRIEVES.items():
        answer = http.get(url + path, headers={"Accept": accept})
        assert_4xx_message(answer, 406)
        assert reason in answer.text, (name, answer.text)
    pixel_data = http.get(url + "/pixeldata", headers={"Accept": "*/*"})
    assert pixel_data.status_code < 500, pixel_data.text


def test_unknown_vr_outside_the_pixel_attributes_is_a_406_when_transcoding(http):
    """pydicom's writer cannot write what it cannot read ('Unknown Value Representation'), in either byte order."""
    for syntax in ("1.2.840.10008.1.2.1", ExplicitVRBigEndian):
        endian = "<" if syntax == "1.2.840.10008.1.2.1" else ">"
        ds = make_dataset(transfer_syntax=syntax)
        data = splice(ds, 0x0008103E, element(0x0008103E, b"ZZ", b"abcd", endian=endian))
        response = http.post("/v2/studies", content=data, headers=SINGLE)
        assert response.status_code == 202, response.text
        (url,) = stored_urls(response)
        for target in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2" if endian == "<" else "1.2.840.10008.1.2.1"):
            answer = http.get(url, headers={"Accept": f"application/dicom; transfer-syntax={target}"})
            assert_4xx_message(answer, 406)
            assert "Unknown Value Representation 'ZZ'" in answer.text, answer.text
            assert "Traceback" not in answer.text


def test_big_endian_file_with_damaged_bits_allocated_is_406_when_transcoded(http):
    ds = make_dataset(transfer_syntax=ExplicitVRBigEndian)
    data = splice(ds, BITS, element(BITS, b"US", b"\x00\x00", endian=">"))
    response = http.post("/v2/studies", content=data, headers=SINGLE)
    (url,) = stored_urls(response)
    answer = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"})
    assert_4xx_message(answer, 406)
    assert "BitsAllocated '0' is invalid" in answer.text


TAIL = 0xFFFAFFFA  # Digital Signatures Sequence: a sequence after the Pixel Data
ITEM_CONTENT = element(0x04000005, b"US", b"\x02\x00")
CUT_AFTER_PIXEL_DATA = {
    "inside an undefined-length item": sequence(TAIL, [item(ITEM_CONTENT, undefined=True)], undefined=True)[:-16],
    "before the sequence delimiter": sequence(TAIL, [item(ITEM_CONTENT, undefined=True)], undefined=True)[:-8],
    "inside a defined-length item": sequence(TAIL, [item(ITEM_CONTENT)], undefined=True)[:-12],
    "inside an encapsulated value": element(0x7FE10010, b"OB", item(b"abc") + b"...", length=UNDEFINED),
}


@pytest.mark.parametrize("cut", CUT_AFTER_PIXEL_DATA)
def test_file_cut_inside_a_sequence_after_the_pixel_data_is_refused(http, version, cut):
    """An upload cut short after the Pixel Data passed the old check (it did not follow sequences) and was stored;
    its transcoding then failed. It is refused with Azure's validation failure, and nothing is kept."""
    ds = make_dataset()
    data = to_bytes(ds) + CUT_AFTER_PIXEL_DATA[cut]
    response = http.post(f"/{version}/studies", content=data, headers=SINGLE)
    reason, comments = failure(response)
    assert reason == VALIDATION_FAILURE
    (comment,) = comments
    assert comment.startswith(("DICOM100: (fffa,fffa) - The ", "DICOM100: (7fe1,0010) - The ")), comment
    assert "file" in comment, comment
    found = http.get("/v2/instances", params={"SOPInstanceUID": ds.SOPInstanceUID}, headers=ACCEPT)
    assert found.status_code == 204


def test_whole_sequence_after_the_pixel_data_is_stored_and_transcoded(http):
    ds = make_dataset()
    data = to_bytes(ds) + sequence(TAIL, [item(ITEM_CONTENT, undefined=True)], undefined=True)
    response = http.post("/v2/studies", content=data, headers=SINGLE)
    assert response.status_code == 200, response.text
    (url,) = stored_urls(response)
    answer = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2"})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_deeply_nested_sequences_are_refused_with_bounded_memory_and_time(server, http, undefined):
    """400 nested sequences were stored; transcoding one then hit the recursion limit and pydicom's re-wrapped
    tracebacks grew without bound (24 GB in-process). The depth is bounded at store time; the server's memory
    stays put and the answer is quick."""
    before = rss_kib(server.process.pid)
    ds = make_dataset()
    started = time.monotonic()
    data = splice(ds, 0x0040A730, nested_sequences(400, undefined))
    response = http.post("/v2/studies", content=data, headers=SINGLE)
    elapsed = time.monotonic() - started
    reason, comments = failure(response)
    assert reason == VALIDATION_FAILURE
    assert comments == ["DICOM100: (0040,a730) - Sequences are nested more than 32 deep."]
    assert elapsed < 10, elapsed
    assert rss_kib(server.process.pid) - before < 100 * 1024
    assert http.get("/health/check").status_code == 200


def test_nesting_up_to_the_limit_is_stored_and_transcoded(http):
    ds = make_dataset()
    response = http.post("/v2/studies", content=splice(ds, 0x0040A730, nested_sequences(32)), headers=SINGLE)
    assert response.status_code == 200, response.text
    (url,) = stored_urls(response)
    answer = http.get(url, headers={"Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2"})
    assert answer.status_code == 200, answer.text
    deeper = http.post("/v2/studies", content=splice(make_dataset(), 0x0040A730, nested_sequences(33)), headers=SINGLE)
    assert failure(deeper)[1] == ["DICOM100: (0040,a730) - Sequences are nested more than 32 deep."]


def test_value_longer_than_its_item_is_refused(http):
    inner = element(0x0040A160, b"UT", b"text", length=400)
    data = splice(make_dataset(), 0x0040A730, sequence(0x0040A730, [item(inner + b"\0" * 8)]))
    reason, comments = failure(http.post("/v2/studies", content=data, headers=SINGLE))
    assert reason == VALIDATION_FAILURE
    assert comments == ["DICOM100: (0040,a730) - A value in (0040,a730) is 400 bytes long, past the end of its item."]


def test_deflate_bomb_is_refused_without_inflating_it(server, http):
    """pydicom inflates a deflated data set whole: one that inflates beyond the transcode size limit is refused."""
    ds = make_dataset(transfer_syntax=DeflatedExplicitVRLittleEndian)
    head = to_bytes(ds)
    meta_end = 144 + struct.unpack("<I", head[140:144])[0]  # after File Meta Information Group Length's value
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    filler = element(0x0009_0010, b"LO", b"bomb") + element(0x0009_1001, b"OB", b"", length=200 * 2**20)
    body = deflater.compress(filler)
    zeros = bytes(2**20)
    for _ in range(200):
        body += deflater.compress(zeros)
    data = head[:meta_end] + body + deflater.flush()
    before = rss_kib(server.process.pid)
    reason, comments = failure(http.post("/v2/studies", content=data, headers=SINGLE))
    assert reason == VALIDATION_FAILURE
    assert comments == ["DICOM100: (7fe0,0010) - The deflated data set inflates to more than 104857600 bytes."]
    assert rss_kib(server.process.pid) - before < 100 * 1024


@pytest.mark.parametrize("where", ["PatientName", "StudyDate", "private", "in a sequence"])
def test_unknown_vr_in_an_upload_is_a_validation_failure_or_a_warning_never_272(http, version, where):
    """Azure answers 43264 for an unreadable attribute (spec 2.3): 272 is for failures on the server's side."""
    ds = make_dataset()
    tags = {"PatientName": 0x00100010, "StudyDate": 0x00080020, "private": 0x00091001, "in a sequence": 0x0040A730}
    tag = tags[where]
    raw = element(tag, b"ZZ", b"abcd")
    if where == "in a sequence":
        raw = sequence(tag, [item(element(0x0040A160, b"ZZ", b"abcd"))])
    elif where == "private":
        raw = element(0x00090010, b"LO", b"ACME") + raw
        tag = 0x00090010
    response = http.post(f"/{version}/studies", content=splice(ds, tag, raw), headers=SINGLE)
    body = response.json()
    reasons = [i["00081197"]["Value"][0] for i in body.get("00081198", {}).get("Value", [])]
    assert 272 not in reasons, body
    assert response.status_code in (200, 202, 409), response.text
    if response.status_code == 409:
        assert reasons == [VALIDATION_FAILURE]
