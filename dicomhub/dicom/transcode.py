"""Transcoding between transfer syntaxes. Uncompressed syntaxes only for now (compressed ones arrive with the
pixel pipeline); callers check :func:`can_transcode` first.

Byte order of binary values follows pydicom's reading of them, so that what we write decodes to the same pixels:
Pixel Data of 16 bits or more swaps in units of Bits Allocated, 8-bit Pixel Data encoded as OW swaps in 16-bit
words (PS3.5 OW rule), 1-bit and OB data never swap; other OW/OF/OL/OD/OV values swap in units of their VR.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})
# Syntaxes whose Pixel Data is native (not encapsulated) once the dataset is read
NATIVE = UNCOMPRESSED | {DeflatedExplicitVRLittleEndian}
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


def can_transcode(source: str, target: str) -> bool:
    return source == target or (source in UNCOMPRESSED and target in UNCOMPRESSED)


def pixel_swap_width(bits_allocated: int, vr: str) -> int:
    """Bytes per swapped unit of native Pixel Data between little and big endian; 1 = no swap."""
    if bits_allocated >= 16:
        return bits_allocated // 8
    if bits_allocated == 8 and "OW" in vr:
        return 2
    return 1


def swap_bytes(raw: bytes, width: int) -> bytes:
    """Reverses the byte order of each ``width``-byte unit; a trailing partial unit is left as is."""
    if width <= 1 or not raw:
        return raw
    usable = len(raw) - len(raw) % width
    return np.frombuffer(raw[:usable], dtype=f"u{width}").byteswap().tobytes() + raw[usable:]


def _element_swap_width(elem: DataElement, ds: Dataset) -> int:
    if not isinstance(elem.value, bytes | bytearray):
        return 1  # decoded values (numbers, strings) are re-encoded by the writer
    if int(elem.tag) == _PIXEL_DATA:
        return pixel_swap_width(int(ds.get("BitsAllocated", 16) or 16), elem.VR)
    if elem.VR in _SWAP_WIDTH:
        return _SWAP_WIDTH[elem.VR]
    if "OW" in elem.VR:  # an ambiguous VR such as 'US or OW' still holding raw bytes
        return 2
    return 1


def _swap_binary_values(ds: Dataset) -> None:
    """Byte-swaps raw binary values (OW, OF, ...) in place; pydicom leaves that to the caller."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_binary_values(item)
            continue
        width = _element_swap_width(elem, ds)
        if width > 1:
            elem.value = swap_bytes(bytes(elem.value), width)


def little_endian_pixel_data(ds: Dataset, source: str) -> bytes:
    """The native Pixel Data value of ``ds`` (read from a file in ``source``) in little-endian byte order."""
    raw = ds.PixelData
    if UID(source).is_little_endian:
        return raw
    return swap_bytes(raw, pixel_swap_width(int(ds.get("BitsAllocated", 16) or 16), ds["PixelData"].VR))


def transcode(source: BinaryIO, target: str) -> bytes:
    """Reads a Part-10 file and returns it re-encoded in ``target`` (file meta updated, content unchanged)."""
    ds = pydicom.dcmread(source)
    src = UID(ds.file_meta.TransferSyntaxUID)
    dst = UID(target)
    if src.is_little_endian != dst.is_little_endian:
        _swap_binary_values(ds)
    ds.file_meta.TransferSyntaxUID = dst
    out = io.BytesIO()
    dcmwrite(out, ds, implicit_vr=dst.is_implicit_VR, little_endian=dst.is_little_endian, force_encoding=True)
    return out.getvalue()
