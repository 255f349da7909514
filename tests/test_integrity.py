"""The quick paths for flat uploads in memory answer as the general ones do: the structure check's (a flat
explicit-VR data set checked in one loop) as the full walk, on damaged files made by the fuzz tests' strategy and on
cuts at every byte of a clean file; ``read_flat`` (checked and read in one pass) as the check plus pydicom's reader,
on those, pydicom's test files and files of edge values."""

from __future__ import annotations

import io
import json
import os

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from pydicom.data import get_testdata_files

from dicomhub.dicom.integrity import _flat_and_whole, read_flat, structure_damage
from dicomhub.dicom.json_model import dataset_model
from tests.damaged import element, part10, splice
from tests.factory import make_dataset
from tests.test_fuzz_files import MAX_DEPTH, MAX_INFLATED, damaged_files
from tests.test_json_model import elements, explicit_file

pytestmark = pytest.mark.filterwarnings("ignore")
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def both(data: bytes):
    quick = structure_damage(io.BytesIO(data), len(data), MAX_DEPTH, MAX_INFLATED)
    walked = structure_damage(io.BufferedReader(io.BytesIO(data)), len(data), MAX_DEPTH, MAX_INFLATED)  # type: ignore[arg-type]
    return quick, walked


@FUZZ
@given(data=damaged_files())
def test_quick_path_answers_as_the_walk(data: bytes) -> None:
    quick, walked = both(data)
    assert quick == walked


def test_cuts_and_the_quick_path() -> None:
    """A clean flat file takes the quick path; cut anywhere, the answer is the walk's (truncated, naming the
    element) whichever path runs."""
    data = part10(make_dataset(rows=4, columns=4, StudyDescription="flat"))
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    assert _flat_and_whole(io.BytesIO(data), meta_end, len(data), "<")
    assert both(data) == (None, None)
    for cut in range(meta_end, len(data)):
        quick, walked = both(data[:cut])
        assert quick == walked


def test_what_the_quick_path_leaves_to_the_walk() -> None:
    """Sequences, UN values and undefined lengths are not flat: the walk decides (and finds them whole here)."""
    ds = make_dataset(rows=4, columns=4)
    for raw in (
        element(0x00081140, b"SQ", b""),
        element(0x00091010, b"UN", b"abcd"),
        element(0x00091010, b"OB", b"", length=0xFFFFFFFF) + b"\xfe\xff\xdd\xe0\0\0\0\0",
    ):
        data = splice(ds, 0x00081140 if raw[4:6] == b"SQ" else 0x00091010, raw)
        meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
        assert not _flat_and_whole(io.BytesIO(data), meta_end, len(data), "<")
        assert both(data) == (None, None)


# -- read_flat: the structure check and pydicom's reader in one pass, for flat uploads in memory ----------------------
def _held(elem):
    """An element as held by a data set, comparable across readers (raw tuple, or tag, VR and value once decoded)."""
    return tuple(elem) if isinstance(elem, tuple) else (elem.tag, elem.VR, elem.value)


def _decoded(ds: pydicom.Dataset) -> dict:
    """Tag -> value, every element decoded (pydicom's reader decodes two file meta elements of its own accord)."""
    return {tag: ds[tag].value for tag in list(ds._dict)}


def assert_read_as_pydicom_reads(data: bytes) -> bool:
    """When read_flat reads a file: the structure check passes it, and pydicom's reader gives the same elements (raw,
    in file order), file meta, encodings, preamble and position; the store's model and errors from either are the
    same. Returns whether read_flat read it."""
    try:
        flat = read_flat(io.BytesIO(data), len(data))
    except Exception as exc:  # the store then takes the usual path, where pydicom's reader fails too
        with pytest.raises(type(exc)):
            pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return False
    if flat is None:
        return False
    ds, offset = flat
    assert structure_damage(io.BytesIO(data), len(data), MAX_DEPTH, MAX_INFLATED) is None
    f = io.BytesIO(data)
    reference = pydicom.dcmread(f, stop_before_pixels=True)
    assert offset == f.tell()
    assert [_held(e) for e in ds._dict.values()] == [_held(e) for e in reference._dict.values()]
    assert list(ds._dict) == list(reference._dict)
    assert _decoded(ds.file_meta) == _decoded(reference.file_meta)
    assert ds._character_set == reference._character_set
    assert ds.original_character_set == reference.original_character_set
    assert (ds.original_encoding, ds.preamble) == (reference.original_encoding, reference.preamble)
    assert (ds.is_implicit_VR, ds.is_little_endian) == (reference.is_implicit_VR, reference.is_little_endian)
    for validate in (True, False):
        assert json.dumps(dataset_model(ds, validate)) == json.dumps(dataset_model(reference, validate))
    return True


def test_read_flat_reads_the_factory_s_files_as_pydicom_does() -> None:
    assert assert_read_as_pydicom_reads(part10(make_dataset(rows=4, columns=4, StudyDescription="flat")))
    ds = make_dataset(rows=4, columns=4, PatientName="Dür^Jörg", ImagePositionPatient=[1, 2.5, 3])
    ds.SpecificCharacterSet = "ISO_IR 100"
    assert assert_read_as_pydicom_reads(part10(ds))
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):  # not flat ones
        assert not assert_read_as_pydicom_reads(part10(make_dataset(rows=4, columns=4, transfer_syntax=syntax)))


@pytest.mark.parametrize("path", get_testdata_files("*.dcm"), ids=os.path.basename)
def test_read_flat_on_pydicom_test_files(path: str) -> None:
    with open(path, "rb") as f:
        assert_read_as_pydicom_reads(f.read())


@FUZZ
@given(data=damaged_files())
def test_read_flat_on_damaged_files(data: bytes) -> None:
    assert_read_as_pydicom_reads(data)


@FUZZ
@given(body=elements())
def test_read_flat_on_files_of_edge_values(body: bytes) -> None:
    """Every VR with padding, NULs, non-ASCII text, character sets, odd lengths (sequences make it not flat)."""
    assert_read_as_pydicom_reads(explicit_file(body))
