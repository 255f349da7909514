"""Integrity of a Part-10 file beyond what pydicom checks: every element header read by hand, without recursion,
before pydicom parses anything.

pydicom reads a file cut short without complaint, parses nested sequences by recursion (a file of 400 nested
sequences exhausts the stack, and pydicom's writer then re-wraps each level's traceback into the next until memory
runs out), and inflates a deflated data set whole. :func:`structure_damage` finds what must not be stored: a file
that ends inside an element, item, sequence or encapsulated value (an upload cut short; after the pixel data too),
sequences nested deeper than a limit, more elements than a limit, a value longer than what holds it, a deflated
data set that inflates beyond a limit. It follows pydicom's reading rules (an explicit VR that is not two capital
letters is an implicit VR header; undefined-length UN, SQ and unknown private values with items are sequences;
items may switch to implicit VR), so a file it passes is one pydicom reads, with bounded recursion.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, PrivateTransferSyntaxes
from pydicom.valuerep import VR as VR_

from dicomhub.dicom.tags import format_tag

_TRANSFER_SYNTAX = 0x00020010
SPECIFIC_CHARACTER_SET = 0x00080005
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
# Elements and items of one file, nested ones included: a large enhanced multi-frame object has ~100,000; each costs
# pydicom some hundred bytes and the metadata JSON as much again, so a file of millions of tiny elements is refused.
MAX_ELEMENTS = 1_000_000
_CHUNK = 1 << 16
_DATASET, _SEQUENCE, _ITEM_LEVEL, _FRAGMENTS = range(4)

Header = tuple[int, bytes | None, int]  # (tag, VR as read or None for an implicit header, length)


@dataclass(frozen=True)
class Damage:
    """Why a file must not be stored: the top-level element it is in, a sentence, and whether the file is merely
    cut short (an upload that ended early) rather than malformed."""

    tag: int
    message: str
    truncated: bool


def _header(read: Callable[[int], bytes], endian: str, implicit: bool) -> Header | None:
    """(tag, VR, length) of the element header read next, or ``None`` when the data ends inside it."""
    head = read(8)
    if len(head) < 8:
        return None
    group, element = struct.unpack(endian + "HH", head[:4])
    vr = head[4:6]
    if implicit or not (b"AA" <= vr <= b"ZZ"):  # a writer that switched to implicit VR (pydicom reads it so too)
        return group << 16 | element, None, struct.unpack(endian + "I", head[4:])[0]
    if vr in _LONG_VRS:
        extra = read(4)
        if len(extra) < 4:
            return None
        return group << 16 | element, vr, struct.unpack(endian + "I", extra)[0]
    return group << 16 | element, vr, struct.unpack(endian + "H", head[6:])[0]


def read_element_header(f: BinaryIO, endian: str, implicit: bool) -> tuple[int, int] | None:
    """(tag, length) of the element header at the file position, or ``None`` when the file ends inside it."""
    header = _header(f.read, endian, implicit)
    return None if header is None else (header[0], header[2])


def structure_damage(f: BinaryIO, size: int, max_depth: int, max_inflated: int) -> Damage | None:
    """What is wrong with the structure of the Part-10 file ``f`` of ``size`` bytes, or ``None``.

    ``None`` too when it is not a Part-10 file with a known transfer syntax: pydicom and the caller's checks name
    those problems. ``max_depth`` bounds the nesting of sequences; ``max_inflated`` the inflated size of a deflated
    data set (pydicom inflates it whole in memory).
    """
    f.seek(128)
    if f.read(4) != b"DICM":
        return None
    files = _FileSource(f, size)
    syntax, damage = _file_meta(files)
    if damage is not None or syntax is None or not UID(syntax).is_transfer_syntax:
        return damage
    ts = UID(syntax)
    flat = isinstance(f, io.BytesIO) and not ts.is_deflated and not ts.is_implicit_VR  # an upload in memory
    if flat and _flat_and_whole(f, files.tell(), size, "<" if ts.is_little_endian else ">"):
        return None
    source = _InflatedSource(f, max_inflated) if ts.is_deflated else files
    walk = _Walk(source, ts.is_implicit_VR, "<" if ts.is_little_endian else ">", max_depth)
    try:
        return walk.run()
    except _InflatedTooLarge:
        return Damage(0x7FE00010, f"the deflated data set inflates to more than {max_inflated} bytes.", False)
    except zlib.error as exc:
        return Damage(0x00020010, f"the deflated data set cannot be inflated ({exc}).", False)


def _flat_and_whole(f: io.BytesIO, start: int, size: int, endian: str) -> bool:
    """The common case at a fraction of the walk's cost: True when the data set (explicit VR, from ``start``) is
    top-level elements only, each of a defined length that fits in the file, none a sequence, UN or item, and at
    most :data:`MAX_ELEMENTS` of them. The walk finds nothing wrong in such a data set; anything else is its job."""
    header = struct.Struct(endian + "HH2sH")
    long_length = struct.Struct(endian + "I")
    position, count = start, 0
    with f.getbuffer() as data:
        while position < size:
            if size - position < 8:
                return False
            group, _, vr, length = header.unpack_from(data, position)
            if group == 0xFFFE or vr in (b"SQ", b"UN") or not (b"AA" <= vr <= b"ZZ"):
                return False
            if vr in _LONG_VRS:
                if size - position < 12:
                    return False
                (length,) = long_length.unpack_from(data, position + 8)
                position += 12
            else:
                position += 8
            if length == _UNDEFINED or length > size - position:
                return False
            position += length
            count += 1
    return count <= MAX_ELEMENTS


# -- flat uploads in memory: checked and read in one pass -----------------------------------------------------------
_FLAT_VRS = frozenset(vr.encode() for vr in VR_) - {b"SQ", b"UN", b"SV", b"UV"}  # two capital letters each
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # where pydicom's stop_before_pixels stops
_FLAT_HEADER = struct.Struct("<HH2sH")
_FLAT_LONG_LENGTH = struct.Struct("<I")


def read_flat(f: BinaryIO, size: int) -> tuple[FileDataset, int] | None:
    """An upload in memory whose structure :func:`structure_damage` would pass on its quick path, read as
    ``pydicom.dcmread(f, stop_before_pixels=True)`` reads it: (data set, offset of the pixel data element or the
    file size), the file positioned there. ``None`` for anything else, to be checked and read the usual way.

    Accepted: a Part-10 file of explicit VR little endian (any such transfer syntax but deflated), its file meta
    group and data set made of top-level elements only, each of a known VR other than SQ, UN, SV and UV and of a
    defined length that fits, without command set elements. Its element headers are read once, for both the check
    and the data set; pydicom's own classes hold the result (raw elements, encodings, file meta), so values decode
    as they would from pydicom's reader (tests/test_integrity.py compares the two on many files). pydicom's reader
    spent most of its 160 µs on a CT header building datasets element by element.
    """
    if not isinstance(f, io.BytesIO) or size < 144:
        return None
    with f.getbuffer() as data:
        if data[128:132] != b"DICM":
            return None
        elements = _flat_elements(data, 132, size)
        if elements is None:
            return None
        meta: dict[BaseTag, RawDataElement] = {}
        main: dict[BaseTag, RawDataElement] = {}
        offset = size
        for tag, vr, length, start in elements:
            if tag >> 16 == 2 and not main:
                target = meta
            elif tag >> 16 in (0, 2) or tag >> 16 == 0xFFFE:
                return None  # command set elements, a file meta element after the data set's first: pydicom's way
            else:
                target = main
            if target is main and tag in _PIXEL_TAGS and offset == size:
                offset = start - (12 if vr in _LONG_VRS else 8)
            if offset != size:
                continue  # past the pixel data: checked above, not read (stop_before_pixels)
            value = bytes(data[start : start + length]) if length else empty_value_for_VR(vr.decode(), raw=True)
            key = BaseTag(tag)
            target[key] = RawDataElement(key, vr.decode(), length, value, start, False, True)
        preamble = bytes(data[:128])
    syntax = meta.get(BaseTag(_TRANSFER_SYNTAX))
    if not meta or not main or syntax is None or not syntax.value:
        return None
    ts = UID(syntax.value.decode("ascii", "replace").rstrip("\0 "))
    if not ts.is_transfer_syntax or ts.is_implicit_VR or not ts.is_little_endian or ts.is_deflated:
        return None
    if ts in PrivateTransferSyntaxes:
        return None
    file_meta = FileMetaDataset(Dataset(meta))
    file_meta.set_original_encoding(False, True, default_encoding)
    dataset = Dataset(main)
    encoding = default_encoding
    if SPECIFIC_CHARACTER_SET in main:
        encoding = convert_encodings(convert_raw_data_element(main[BaseTag(SPECIFIC_CHARACTER_SET)]).value)
    dataset.set_original_encoding(False, True, encoding)
    ds = FileDataset(f, dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    f.seek(offset)
    return ds, offset


def _flat_elements(data: memoryview, start: int, size: int) -> list[tuple[int, bytes, int, int]] | None:
    """(tag, VR, length, value offset) of every element from ``start`` to the end (explicit VR little endian), or
    ``None`` unless each has a flat VR and a defined length that fits and there are at most :data:`MAX_ELEMENTS`."""
    found = []
    position = start
    while position < size:
        if size - position < 8:
            return None
        group, element, vr, length = _FLAT_HEADER.unpack_from(data, position)
        if vr not in _FLAT_VRS:
            return None
        if vr in _LONG_VRS:
            if size - position < 12:
                return None
            (length,) = _FLAT_LONG_LENGTH.unpack_from(data, position + 8)
            position += 12
        else:
            position += 8
        if length == _UNDEFINED or length > size - position:
            return None
        found.append((group << 16 | element, vr, length, position))
        position += length
    return found if len(found) <= MAX_ELEMENTS else None


def _file_meta(source: _FileSource) -> tuple[str | None, Damage | None]:
    """The transfer syntax of the file meta group (elements of group 2, explicit VR little endian), and damage."""
    syntax = None
    while not source.at_end():
        start = source.tell()
        header = _header(source.read, "<", False)
        if header is None:
            return syntax, Damage(0x00020000, "the file ends inside the file meta information.", True)
        tag, _, length = header
        if tag >> 16 != 2:
            source.seek(start)
            break
        if length == _UNDEFINED or length > source.size - source.tell():
            return syntax, Damage(tag, "the value runs past the end of the file.", length != _UNDEFINED)
        value = source.read(length)
        if tag == _TRANSFER_SYNTAX:
            syntax = value.decode("ascii", "replace").rstrip("\0 ")
    return syntax, None


class _InflatedTooLarge(Exception):
    pass


class _FileSource:
    """The file's bytes, read forward from the file position."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size: int | None = size
        self.read = f.read

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int) -> None:
        self.f.seek(offset)

    def peek(self, n: int) -> bytes:
        start = self.f.tell()
        data = self.f.read(n)
        self.f.seek(start)
        return data

    def skip(self, n: int) -> int:
        """Moves ``n`` bytes on, or to the end of the file; returns how far it moved."""
        start = self.f.tell()
        moved = max(0, min(n, self.size - start))
        self.f.seek(start + moved)
        return moved

    def at_end(self) -> bool:
        return self.f.tell() >= self.size


class _InflatedSource:
    """The inflated data set of a deflated file, read forward; never more than ``limit`` bytes of it."""

    size: int | None = None  # unknown until the end is reached

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f = f
        self.limit = limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._offset = 0  # offset in the inflated stream of the buffer's first byte
        self._inflated = 0

    def _fill(self, n: int) -> None:
        while len(self._buffer) < n and not self._inflater.eof:
            compressed = self._inflater.unconsumed_tail or self.f.read(_CHUNK)
            if not compressed:
                return
            out = self._inflater.decompress(compressed, _CHUNK)
            self._inflated += len(out)
            if self._inflated > self.limit:
                raise _InflatedTooLarge
            self._buffer += out

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int) -> None:  # only forward: a guessed sequence is left at its end
        self.skip(offset - self._offset)

    def read(self, n: int) -> bytes:
        self._fill(n)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._offset += len(data)
        return data

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return bytes(self._buffer[:n])

    def skip(self, n: int) -> int:
        moved = 0
        while moved < n:
            piece = self.read(min(n - moved, _CHUNK))
            if not piece:
                break
            moved += len(piece)
        return moved

    def at_end(self) -> bool:
        return not self.peek(1)


@dataclass
class _Level:
    """One open container: the data set, a sequence, an item, or an encapsulated value's fragments."""

    kind: int
    tag: int  # the top-level element it belongs to (named in the error comment)
    end: int | None  # where it ends; None: at its delimiter (or the end of the file for the data set)
    limit: int | None  # where it must end at the latest: its end, or its parent's limit, or the file's size
    implicit: bool
    guessed: bool = False  # a value with no sequence VR that starts with an item: a plain value if it is not one


class _Failed(Exception):
    """``bounded``: a limit was crossed (depth, element count), which reading a guessed sequence as a plain value
    must not hide; otherwise the structure is wrong."""

    def __init__(self, message: str, truncated: bool, bounded: bool = False) -> None:
        super().__init__(message)
        self.message, self.truncated, self.bounded = message, truncated, bounded


class _Walk:
    """An iterative walk over every element of a data set (see :func:`structure_damage`)."""

    def __init__(self, source: _FileSource | _InflatedSource, implicit: bool, endian: str, max_depth: int) -> None:
        self.source = source
        self.endian = endian
        self.max_depth = max_depth
        self.levels = [_Level(_DATASET, 0, None, source.size, implicit)]
        self.depth = 0
        self.elements = 0
        self.last_tag = 0  # the last top-level element read

    def run(self) -> Damage | None:
        while True:
            level = self.levels[-1]
            if level.end is not None and self.source.tell() >= level.end:
                self._pop()
                continue
            if len(self.levels) == 1 and self.source.at_end():
                return None
            try:
                self._step(level)
            except _Failed as failed:
                if failed.bounded or not self._give_up_guess():
                    tag = self.levels[1].tag if len(self.levels) > 1 else self.last_tag
                    return Damage(tag, failed.message, failed.truncated)

    def _step(self, level: _Level) -> None:
        if level.end is not None and level.end - self.source.tell() < 8:
            raise _Failed(f"an item of {format_tag(level.tag)} ends inside an element header.", False)
        if level.kind in (_DATASET, _ITEM_LEVEL):
            self._element(level)
        elif level.kind == _SEQUENCE:
            self._item(level)
        else:
            self._fragment(level)

    def _element(self, level: _Level) -> None:
        header = _header(self.source.read, self.endian, level.implicit)
        if header is None:
            if level.kind == _DATASET:
                raise _Failed("the file ends inside the header of the element after this one.", True)
            raise _Failed(f"the file ends inside an item of {format_tag(level.tag)}.", True)
        tag, vr, length = header
        if tag == _ITEM_END:
            if level.kind != _ITEM_LEVEL or level.end is not None:
                raise _Failed("an item delimiter stands outside an item of undefined length.", False)
            self.levels.pop()
            return
        self._count()
        top = level.tag if level.kind != _DATASET else tag
        if level.kind == _DATASET:
            self.last_tag = tag
        implicit = vr is None
        if length == _UNDEFINED:
            if vr == b"SQ" or vr == b"UN" or (implicit and _sequence_by_dictionary(tag, self._next_is_item)):
                self._push(_Level(_SEQUENCE, top, None, level.limit, level.implicit))
            else:
                self.levels.append(_Level(_FRAGMENTS, top, None, level.limit, level.implicit))
            return
        start = self.source.tell()
        self._check_fits(level, start, length, top)
        if length >= 8 and (vr == b"SQ" or ((implicit or vr == b"UN") and self._nested(tag))):
            guessed = vr != b"SQ" and _dictionary_vr(tag) != "SQ"
            self._push(_Level(_SEQUENCE, top, start + length, start + length, level.implicit, guessed))
            return
        if self.source.skip(length) < length:
            raise _Failed(f"the value is {length} bytes long but the file holds fewer.", True)

    def _item(self, level: _Level) -> None:
        tag, length = self._item_header(level)
        if tag == _SEQUENCE_END:
            self._pop()
            if level.end is not None:  # pydicom stops reading the sequence there too
                self.source.seek(level.end)
            return
        if tag != _ITEM:
            raise _Failed(f"the sequence {format_tag(level.tag)} holds an element that is not an item.", False)
        self._count()
        implicit = level.implicit or self._item_is_implicit()
        if length == _UNDEFINED:
            self.levels.append(_Level(_ITEM_LEVEL, level.tag, None, level.limit, implicit))
            return
        start = self.source.tell()
        self._check_fits(level, start, length, level.tag)
        self.levels.append(_Level(_ITEM_LEVEL, level.tag, start + length, start + length, implicit))

    def _fragment(self, level: _Level) -> None:
        tag, length = self._item_header(level)
        if tag == _SEQUENCE_END:
            self.levels.pop()
            return
        if tag != _ITEM or length == _UNDEFINED:
            raise _Failed("the encapsulated value holds something other than fragment items.", False)
        self._count()
        moved = self.source.skip(length)
        if moved < length:
            raise _Failed(f"a {length}-byte fragment holds only {moved} bytes before the file ends.", True)

    def _item_header(self, level: _Level) -> tuple[int, int]:
        head = self.source.read(8)
        if len(head) < 8:
            if level.kind == _FRAGMENTS:
                raise _Failed("the encapsulated value has no sequence delimiter: the file ends inside it.", True)
            raise _Failed(f"the file ends inside the sequence {format_tag(level.tag)}: no sequence delimiter.", True)
        group, element, length = struct.unpack(self.endian + "HHI", head)
        return group << 16 | element, length

    def _check_fits(self, level: _Level, start: int, length: int, top: int) -> None:
        if level.limit is None or start + length <= level.limit:
            return
        if level.limit == self.source.size:
            raise _Failed(
                f"the value is {length} bytes long but the file holds only {level.limit - start} of them.", True
            )
        raise _Failed(f"a value in {format_tag(top)} is {length} bytes long, past the end of its item.", False)

    def _push(self, sequence: _Level) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _Failed(f"sequences are nested more than {self.max_depth} deep.", False, bounded=True)
        self.levels.append(sequence)

    def _pop(self) -> None:
        if self.levels.pop().kind == _SEQUENCE:
            self.depth -= 1

    def _count(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise _Failed(f"the data set holds more than {MAX_ELEMENTS} elements and items.", False, bounded=True)

    def _give_up_guess(self) -> bool:
        """After a failure inside a guessed sequence: read that value as a plain value instead, if there is one."""
        guessed = [i for i, level in enumerate(self.levels) if level.guessed]
        if not guessed:
            return False
        while len(self.levels) > guessed[-1]:
            level = self.levels[-1]
            self._pop()
        self.source.seek(level.end)
        return True

    def _next_is_item(self) -> bool:
        head = self.source.peek(4)
        return len(head) == 4 and struct.unpack(self.endian + "HH", head) == (0xFFFE, 0xE000)

    def _nested(self, tag: int) -> bool:
        """A defined-length value pydicom reads as a sequence when asked for it: SQ in the dictionary, or a private
        value that starts with an item (pydicom's private dictionary may call it SQ)."""
        return _sequence_by_dictionary(tag, self._next_is_item)

    def _item_is_implicit(self) -> bool:
        """pydicom reads an item of an explicit VR data set as implicit VR when its first VR is not two letters."""
        head = self.source.peek(6)
        return len(head) == 6 and not (b"AA" <= head[4:6] <= b"ZZ")


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _sequence_by_dictionary(tag: int, next_is_item: Callable[[], bool]) -> bool:
    vr = _dictionary_vr(tag)
    return vr == "SQ" or (vr is None and next_is_item())
