"""Integrity of a Part-10 file beyond what pydicom checks: element headers read by hand, and whether the file ends
inside an element (an upload cut short)."""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID

_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_DELIMITER, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def read_element_header(f: BinaryIO, endian: str, implicit: bool) -> tuple[int, int] | None:
    """(tag, length) of the element header at the file position, or ``None`` when the file ends inside it."""
    head = f.read(8)
    if len(head) < 8:
        return None
    group, element = struct.unpack(endian + "HH", head[:4])
    vr = head[4:6]
    if implicit or not (b"AA" <= vr <= b"ZZ"):  # a writer that switched to implicit VR (pydicom reads it so too)
        (length,) = struct.unpack(endian + "I", head[4:])
    elif vr in _LONG_VRS:
        extra = f.read(4)
        if len(extra) < 4:
            return None
        (length,) = struct.unpack(endian + "I", extra)
    else:
        (length,) = struct.unpack(endian + "H", head[6:])
    return group << 16 | element, length


def truncation(f: BinaryIO, ds: Dataset, offset: int, size: int) -> tuple[int, str] | None:
    """(tag, reason) when the file ends inside an element: an upload cut short must not be stored as an instance.

    pydicom reads a short last value without complaint. The elements before the pixel data were complete if pydicom
    reached the pixel data; so this follows the pixel data (its length, or for encapsulated data the fragments up to
    the sequence delimiter) and any elements after it, or else checks the last element pydicom read.
    """
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts.is_deflated:
        return None  # offsets are into the inflated stream; a cut deflate stream fails to inflate instead
    endian = "<" if ts.is_little_endian else ">"
    if offset < size:
        f.seek(offset)
        return _follow_elements(f, size, endian, ts.is_implicit_VR)
    last = max(ds.elements(), key=lambda e: getattr(e, "value_tell", None) or getattr(e, "file_tell", 0), default=None)
    if last is None:
        return None
    tag = int(last.tag)
    if getattr(last, "is_undefined_length", False) or getattr(last, "length", 0) == _UNDEFINED:
        f.seek(max(size - 8, 0))
        tail = f.read(8)
        delimiter = struct.pack(endian + "HHI", 0xFFFE, 0xE0DD, 0)
        return None if tail == delimiter else (tag, "the file ends before the sequence delimiter.")
    value_tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if value_tell is None or length is None:
        return None
    end = value_tell + length
    if end > size:
        return tag, f"the value is {length} bytes long but the file holds only {size - value_tell} of them."
    if 0 < size - end < 8:
        return tag, "the file ends inside the header of the element after this one."
    return None


def _follow_elements(f, size: int, endian: str, implicit: bool) -> tuple[int, str] | None:
    """Follows the top-level elements from the file position (the pixel data) to the end of the file."""
    tag = _PIXEL_DATA
    while f.tell() < size:
        header = read_element_header(f, endian, implicit)
        if header is None:
            return tag, "the file ends inside the header of the element after this one."
        tag, length = header
        start = f.tell()
        if length != _UNDEFINED:
            if start + length > size:
                return tag, f"the value is {length} bytes long but the file holds only {size - start} of them."
            f.seek(start + length)
            continue
        if tag != _PIXEL_DATA:
            return None  # an undefined-length sequence after the pixel data: not followed further
        while True:  # encapsulated pixel data: fragment items up to the sequence delimiter (always little endian)
            item = f.read(8)
            if len(item) < 8:
                return tag, "the encapsulated value has no sequence delimiter: the file ends inside it."
            group, element, length = struct.unpack("<HHI", item)
            if group << 16 | element == _SEQUENCE_DELIMITER:
                break
            if group << 16 | element != _ITEM or length == _UNDEFINED:
                return tag, "the encapsulated value holds something other than fragment items."
            if f.tell() + length > size:
                return tag, f"a {length}-byte fragment holds only {size - f.tell()} bytes before the file ends."
            f.seek(length, 1)
    return None
