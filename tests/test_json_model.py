"""The store's single pass (``dataset_model``) against the two passes it replaces: ``dataset_errors`` then
``dataset_to_json`` of the elements without errors (v2), and ``dataset_to_json`` alone (v1). Same errors in the same
order, same JSON (compared as serialised text, so 1 and 1.0 differ), same unconvertible tags: on pydicom's test
files and on files written byte by byte with values at every edge its decoding has (padding, NULs, control and
non-ASCII characters, empty and multiple values, odd lengths, ranges, character sets, UN of known tags, sequences).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import warnings

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from dicomhub.dicom.json_model import dataset_model, dataset_to_json
from dicomhub.dicom.validation import dataset_errors
from dicomhub.domain.attributes import REQUIRED_UIDS
from tests.damaged import element, item, sequence

pytestmark = pytest.mark.filterwarnings("ignore")
UNCHECKED = frozenset(REQUIRED_UIDS)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

TEXT = [
    b"", b" ", b"\0", b"A", b"AB ", b"abc", b"A\\B", b"A\\", b"\\", b"A\\\\B", b" A", b"A\0", b"A\0B\0", b"A \\B ",
    b"A\x01", b"A\nB", b"\x1b$B", b"caf\xc3\xa9", b"\xe9t\xe9", b"1", b"1.5", b"-1", b"+1", b"1e5", b"1e999", b".5",
    b"5.", b" 1", b"1 ", b"1\\2", b"1\\", b"1 \\2", b"0.12345678901234567", b"1234567890123", b"NaN", b"inf", b"-0",
    b"20240102", b"20240230", b"2024-01-02", b"20240102-20240103", b"-20240102", b"120000", b"25", b"1200",
    b"120000.123456", b"2024010212", b"2024010212+0100", b"1.2.3", b"1.2.3\0", b"1.2.3\0\0", b"1.02.3", b"01.2",
    b"1.2.3\\1.2.4", b"1.2.3 ", b"Doe^John", b"Doe^John=", b"Doe^John==", b"a=b=c", b"a=b=c=d", b"=b", b"Doe^John ",
    b"Doe^John\\Roe^Jane", b"Doe^John\\", b"x" * 17, b"x" * 65, b"1" * 70, b"ORIGINAL\\PRIMARY", b"DERIVED \\PRIMARY",
    b"lower", b"030Y", b"30Y", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"\\ISO 2022 IR 87", b"ISO_IR 13",
    b"http://x/y", b"http://x y", b"AE TITLE", b"  AE  ", b"A\x00\x00 ",
]  # fmt: skip
TEXT_VRS = ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
BINARY_VRS = ["US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "OW", "UN"]
# tags by VR, public (dictionary VR as written, or another) and private; UN of public tags is read as their own VR
TAGS = [
    0x00080005, 0x00080008, 0x00080016, 0x00080018, 0x00080020, 0x00080030, 0x00080050, 0x00080054, 0x00080060,
    0x00080090, 0x00081030, 0x00100010, 0x00100020, 0x00100030, 0x00101010, 0x00180050, 0x0020000D, 0x0020000E,
    0x00200013, 0x00200032, 0x00280010, 0x00281050, 0x00281101, 0x00283002, 0x00080201, 0x0040A120, 0x00181060,
    0x00091010, 0x00091011, 0x00091012, 0x00291001, 0x00291002,
]  # fmt: skip
SEQUENCE_TAGS = [0x00081140, 0x0040A730, 0x00191010]


def explicit_file(body: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body


def read(data: bytes) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def as_text(value) -> str:
    return json.dumps(value, sort_keys=False, allow_nan=True)


def assert_same(data: bytes) -> None:
    """v2 and v1: the single pass equals the two passes, on fresh parses of the same bytes (an exception of the
    two passes is one of the single pass too)."""
    try:
        read(data)
    except Exception:  # the store refuses what pydicom cannot parse (43264) before any model is made
        return
    for touched in (False, True):  # the store decodes the required attributes before the model
        compare(data, v2_two_passes, lambda ds: dataset_model(ds, True, True, UNCHECKED), touched)
        compare(data, v1_two_passes, lambda ds: dataset_model(ds, False), touched)


def v2_two_passes(ds: pydicom.Dataset) -> tuple:
    errors = dataset_errors(ds, trim_nul=True, skip=UNCHECKED)
    model, unconvertible = dataset_to_json(ds, skip=frozenset(errors))
    return model, errors, unconvertible


def v1_two_passes(ds: pydicom.Dataset) -> tuple:
    model, unconvertible = dataset_to_json(ds)
    return model, {}, unconvertible


def read_touched(data: bytes, touched: bool) -> pydicom.Dataset:
    ds = read(data)
    if touched:
        for tag in (*REQUIRED_UIDS, 0x00100020, 0x00080020):
            with contextlib.suppress(Exception):  # an undecodable one stays raw, as in the store
                ds.get(tag)
    return ds


def compare(data: bytes, reference, single, touched: bool) -> None:
    try:
        model, errors, unconvertible = reference(read_touched(data, touched))
    except Exception as exc:
        with pytest.raises(type(exc)):
            single(read_touched(data, touched))
        return
    got_model, got_errors, got_unconvertible = single(read_touched(data, touched))
    assert list(got_errors.items()) == list(errors.items())
    assert as_text(got_model) == as_text(model)
    assert got_unconvertible == unconvertible


@pytest.mark.parametrize("path", get_testdata_files("*.dcm"), ids=os.path.basename)
def test_pydicom_test_files(path: str) -> None:
    with open(path, "rb") as f:
        assert_same(f.read())


def test_each_value_alone() -> None:
    """Every edge value under every text VR, and binary values of every length up to 9, one element per file."""
    for vr in TEXT_VRS:
        for value in TEXT:
            for tag in (0x00091010, 0x00080050, 0x00200032, 0x0020000D):
                assert_same(explicit_file(element(tag, vr.encode(), value)))
    for vr in BINARY_VRS:
        for length in range(10):
            for fill in (b"\0", b"\xff", b"\x7f\xc0", b"1.2"):
                value = (fill * 10)[:length]
                for tag in (0x00091010, 0x00281101, 0x00280010, 0x00100020, 0x00080016):
                    assert_same(explicit_file(element(tag, vr.encode(), value)))


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Top-level (or item) elements in tag order: text, binary and UN values, a character set, sequences."""
    tags = draw(st.lists(st.sampled_from(TAGS + (SEQUENCE_TAGS if depth < 2 else [])), max_size=8, unique=True))
    parts = []
    for tag in sorted(tags):
        if tag in SEQUENCE_TAGS:
            items = draw(st.lists(elements(depth + 1), max_size=3))
            undefined = draw(st.booleans())
            parts.append(sequence(tag, [item(i, undefined) for i in items], undefined))
            continue
        vr = draw(st.sampled_from(TEXT_VRS + BINARY_VRS))
        text = vr in TEXT_VRS or draw(st.booleans())
        value = draw(st.sampled_from(TEXT)) if text else draw(st.binary(max_size=12))
        parts.append(element(tag, vr.encode(), value))
    return b"".join(parts)


@FUZZ
@given(body=elements())
def test_generated_files(body: bytes) -> None:
    assert_same(explicit_file(body))


def test_implicit_and_big_endian_files_take_pydicom_s_path() -> None:
    from tests.damaged import part10
    from tests.factory import make_dataset

    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1"):
        ds = make_dataset(transfer_syntax=syntax, StudyDescription="café", ImagePositionPatient=[1, 2.5, 3])
        ds.SpecificCharacterSet = "ISO_IR 100"
        assert_same(part10(ds))


def test_numbers_decode_as_pydicom_does() -> None:
    """A spot check that the fast path is taken and right: values pydicom gives, JSON types included."""
    body = b"".join(
        [
            element(0x00080060, b"CS", b"CT"),
            element(0x00180050, b"DS", b"1.5 "),
            element(0x00200013, b"IS", b"7 "),
            element(0x00200032, b"DS", b"0\\-1.25\\3e2 "),
            element(0x00280010, b"US", struct.pack("<H", 512)),
            element(0x00281050, b"DS", b"40"),
        ]
    )
    model, errors, _ = dataset_model(read(explicit_file(body)), True)
    assert errors == {}
    assert model == {
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00180050": {"vr": "DS", "Value": [1.5]},
        "00200013": {"vr": "IS", "Value": [7]},
        "00200032": {"vr": "DS", "Value": [0.0, -1.25, 300.0]},
        "00280010": {"vr": "US", "Value": [512]},
        "00281050": {"vr": "DS", "Value": [40.0]},
    }
    assert as_text(model["00200013"]) == '{"vr": "IS", "Value": [7]}'
