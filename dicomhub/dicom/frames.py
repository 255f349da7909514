"""Byte ranges of each frame in a stored file, found once at store time so frames can be served by range reads."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicomhub.dicom.integrity import read_element_header

Fragment = tuple[int, int]  # (file offset, length)
FrameIndex = list[list[Fragment]]  # frame -> fragments; native frames have exactly one range

_ITEM = 0xFFFEE000
_SEQ_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


MAX_FRAMES = 2**31 - 1  # the largest IS value (PS3.5 6.2), and what the index's frame count column holds
# Frames whose byte ranges are recorded at store time (a whole-slide level has ~150,000): the ranges are held in
# memory and stored as JSON, so a file of a million one-byte frames (or fragments) must not be indexed; its frames are
# read by parsing the file instead, within the transcode size limit.
MAX_INDEXED_FRAMES = 200_000


class ImageAttributeError(ValueError):
    """An attribute that lays out the pixel data (rows, columns, samples, bits, frames) is missing or invalid."""


@dataclass(frozen=True)
class ImageGeometry:
    """The pixel data's layout, read once from the header by :func:`image_geometry`."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    frames: int

    @property
    def frame_length(self) -> int | None:
        """Bytes per native frame; ``None`` for 1-bit frames that do not end on a byte boundary."""
        bits = self.rows * self.columns * self.samples_per_pixel * self.bits_allocated
        return bits // 8 if bits % 8 == 0 else None

    @property
    def decoded_size(self) -> int:
        """Bytes every frame takes once decoded (1-bit samples unpacked to a byte each, as decoders return them)."""
        return self.rows * self.columns * self.samples_per_pixel * max(1, self.bits_allocated // 8) * self.frames


# attribute -> (smallest, largest) valid value; Rows and Columns are US, Bits Allocated is 1 or a multiple of 8
_BOUNDS = {
    "Rows": (1, 0xFFFF),
    "Columns": (1, 0xFFFF),
    "SamplesPerPixel": (1, 4),
    "BitsAllocated": (1, 64),
    "NumberOfFrames": (1, MAX_FRAMES),
}


def image_geometry(ds: Dataset) -> ImageGeometry:
    """The pixel data's layout from the header, every attribute checked: stored files may carry anything
    (a value of the wrong VR, ``abc``, ``30\\2``, ``0``), and whatever reads pixels must fail on it with a reason,
    not with the first exception that happens to come up. Samples per Pixel defaults to 1 and Number of Frames
    to 1 when absent or empty."""
    rows = image_attribute(ds, "Rows", None)
    columns = image_attribute(ds, "Columns", None)
    samples = image_attribute(ds, "SamplesPerPixel", 1)
    bits = image_attribute(ds, "BitsAllocated", None)
    if bits != 1 and bits % 8:
        raise ImageAttributeError(f"BitsAllocated {bits} is invalid (1 or a multiple of 8).")
    return ImageGeometry(rows, columns, samples, bits, image_attribute(ds, "NumberOfFrames", 1))


def image_attribute(ds: Dataset, keyword: str, default: int | None) -> int:
    """One attribute of :data:`_BOUNDS` as a valid integer; ``default`` when absent or empty (an error when
    ``None``). Raises :class:`ImageAttributeError` naming the attribute and its value."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom cannot decode the raw value: unknown VR, wrong length for the VR, ...
        raise ImageAttributeError(f"{keyword} cannot be read: {str(exc).splitlines()[0][:200]}") from None
    if value is None or value == "":
        if default is None:
            raise ImageAttributeError(f"{keyword} is missing.")
        return default
    low, high = _BOUNDS[keyword]
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return int(value)
    shown = "\\".join(map(str, value)) if isinstance(value, MultiValue | list | tuple) else str(value)
    raise ImageAttributeError(f"{keyword} '{shown[:64]}' is invalid.")


def index_frames(f: BinaryIO, offset: int, file_size: int, ds: Dataset, ts: UID) -> FrameIndex | None:
    """Frame byte ranges of the Pixel Data element that starts at ``offset``, or ``None`` if it cannot be indexed.

    Deflated files cannot be indexed (the offsets are of compressed bytes); they are served by decoding instead, and
    so is any file whose pixel data this reader cannot follow: indexing is an optimisation, never a reason to fail
    a store.
    """
    try:
        geometry = image_geometry(ds)
        return _index_frames(f, offset, file_size, ds, geometry, ts)
    except Exception:  # a damaged image attribute or offset table (pydicom raises many kinds): not indexed
        return None


def _index_frames(
    f: BinaryIO, offset: int, file_size: int, ds: Dataset, geometry: ImageGeometry, ts: UID
) -> FrameIndex | None:
    if offset >= file_size or ts.is_deflated or geometry.frames > MAX_INDEXED_FRAMES:
        return None
    f.seek(offset)
    header = read_element_header(f, "<" if ts.is_little_endian else ">", ts.is_implicit_VR)
    if header is None or header[0] != 0x7FE00010:
        return None
    _, length = header
    value_start = f.tell()
    if length != _UNDEFINED:
        per_frame = geometry.frame_length
        if not per_frame:
            return None
        available = min(geometry.frames, (min(length, file_size - value_start)) // per_frame)
        return [[(value_start + i * per_frame, per_frame)] for i in range(available)]
    return _index_encapsulated(f, file_size, ds, geometry.frames)


def _index_encapsulated(f: BinaryIO, file_size: int, ds: Dataset, frames: int) -> FrameIndex | None:
    items: list[tuple[int, int, int]] = []  # (item start, value offset, length)
    while f.tell() + 8 <= file_size:
        start = f.tell()
        tag_group, tag_elem, length = struct.unpack("<HHI", f.read(8))
        tag = (tag_group << 16) | tag_elem
        if tag == _SEQ_DELIMITER:
            break
        if tag != _ITEM or length == _UNDEFINED or f.tell() + length > file_size:
            return None
        items.append((start, f.tell(), length))
        if len(items) > MAX_INDEXED_FRAMES:
            return None
        f.seek(length, 1)
    if not items:
        return None
    bot_start, bot_value, bot_length = items[0]
    fragments = items[1:]
    if not fragments:
        return None
    if frames == 1:
        return [[(off, ln) for _, off, ln in fragments]]
    first_item = fragments[0][0]
    starts: list[int] | None = None
    if bot_length and bot_length % 4 == 0:
        f.seek(bot_value)
        starts = list(struct.unpack(f"<{bot_length // 4}I", f.read(bot_length)))
    elif "ExtendedOffsetTable" in ds:
        raw = ds.ExtendedOffsetTable
        starts = list(struct.unpack(f"<{len(raw) // 8}Q", raw))
    if starts and len(starts) == frames:
        grouped: FrameIndex = [[] for _ in range(frames)]
        boundaries = [first_item + s for s in starts]
        frame = -1
        for item_start, off, ln in fragments:
            while frame + 1 < frames and item_start >= boundaries[frame + 1]:
                frame += 1
            if frame >= 0:
                grouped[frame].append((off, ln))
        return grouped if all(grouped) else None
    if len(fragments) == frames:
        return [[(off, ln)] for _, off, ln in fragments]
    return _group_by_codestream_start(f, fragments, frames)


def _group_by_codestream_start(f: BinaryIO, fragments: list[tuple[int, int, int]], frames: int) -> FrameIndex | None:
    """Without an offset table, a fragment that opens a JPEG / JPEG 2000 codestream starts a new frame."""
    grouped: FrameIndex = []
    for _, off, ln in fragments:
        f.seek(off)
        magic = f.read(2)
        if magic in (b"\xff\xd8", b"\xff\x4f") or not grouped:
            grouped.append([])
        grouped[-1].append((off, ln))
    return grouped if len(grouped) == frames else None
