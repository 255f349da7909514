"""Byte ranges of each frame in a stored file, found once at store time so frames can be served by range reads."""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomhub.dicom.integrity import read_element_header

Fragment = tuple[int, int]  # (file offset, length)
FrameIndex = list[list[Fragment]]  # frame -> fragments; native frames have exactly one range

_ITEM = 0xFFFEE000
_SEQ_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def native_frame_length(ds: Dataset) -> int | None:
    """Bytes per frame of native pixel data; ``None`` when frames are not byte aligned (1-bit) or unknown."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    pixels = rows * cols * samples
    if bits == 1:
        return pixels // 8 if pixels % 8 == 0 else None
    return pixels * (bits // 8)


def index_frames(f: BinaryIO, offset: int, file_size: int, ds: Dataset, ts: UID) -> FrameIndex | None:
    """Frame byte ranges of the Pixel Data element that starts at ``offset``, or ``None`` if it cannot be indexed.

    Deflated files cannot be indexed (the offsets are of compressed bytes); they are served by decoding instead, and
    so is any file whose pixel data this reader cannot follow: indexing is an optimisation, never a reason to fail
    a store.
    """
    try:
        return _index_frames(f, offset, file_size, ds, ts)
    except (struct.error, ValueError, TypeError, OverflowError, OSError):
        return None


def _index_frames(f: BinaryIO, offset: int, file_size: int, ds: Dataset, ts: UID) -> FrameIndex | None:
    if offset >= file_size or ts.is_deflated:
        return None
    f.seek(offset)
    header = read_element_header(f, "<" if ts.is_little_endian else ">", ts.is_implicit_VR)
    if header is None or header[0] != 0x7FE00010:
        return None
    _, length = header
    value_start = f.tell()
    frames = number_of_frames(ds)
    if length != _UNDEFINED:
        per_frame = native_frame_length(ds)
        if not per_frame:
            return None
        available = min(frames, (min(length, file_size - value_start)) // per_frame)
        return [[(value_start + i * per_frame, per_frame)] for i in range(available)]
    return _index_encapsulated(f, file_size, ds, frames)


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
