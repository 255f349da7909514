"""The structure check's quick path for uploads in memory (a flat explicit-VR data set checked in one loop) answers
as the full walk does: on damaged files made by the fuzz tests' strategy and on cuts at every byte of a clean file,
``structure_damage`` of the bytes in memory equals that of the same bytes behind a reader that is not a BytesIO
(which always takes the walk)."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings

from dicomhub.dicom.integrity import _flat_and_whole, structure_damage
from tests.damaged import element, part10, splice
from tests.factory import make_dataset
from tests.test_fuzz_files import MAX_DEPTH, MAX_INFLATED, damaged_files

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
