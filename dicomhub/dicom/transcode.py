"""Transcoding between transfer syntaxes. Uncompressed syntaxes only for now (compressed ones arrive with the
pixel pipeline); callers check :func:`can_transcode` first."""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def can_transcode(source: str, target: str) -> bool:
    return source == target or (source in UNCOMPRESSED and target in UNCOMPRESSED)


def _swap_binary_values(ds: Dataset) -> None:
    """Byte-swaps raw binary values (OW, OF, ...) in place; pydicom leaves that to the caller."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_binary_values(item)
        elif elem.VR in _SWAP_WIDTH and elem.value:
            width = _SWAP_WIDTH[elem.VR]
            if elem.tag == 0x7FE00010 and int(ds.get("BitsAllocated", 16)) == 8:
                continue  # 8-bit pixels in OW are bytes in either order
            raw = elem.value
            usable = len(raw) - len(raw) % width
            swapped = np.frombuffer(raw[:usable], dtype=f"u{width}").byteswap().tobytes()
            elem.value = swapped + raw[usable:]


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
