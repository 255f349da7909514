"""Where the bulk values of a stored file are, and the DICOM JSON that points at them with BulkDataURI.

The file is parsed up to its top-level pixel data (``stop_before_pixels``): large top-level values are skipped, not
read (``defer_size``), and the pixel data element's header is read by hand at the position the parser stopped at.
Each value is then known by its element path, VR, file offset and length, so it can be served by range reads.

An element path is a tag, or a tag, an item index (0-based, as in the JSON ``Value`` array) and a path inside that
item: ``00420011``, ``00880200/0/7FE00010``. Elements after the top-level pixel data are not listed.
"""

from __future__ import annotations

import base64
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomhub.dicom.integrity import read_element_header
from dicomhub.dicom.json_model import BULK_VRS

# VRs whose values DICOM JSON may replace with a BulkDataURI (PS3.18 F.2.5); values of other VRs stay inline.
URI_VRS = BULK_VRS | {"DS", "FL", "FD", "IS", "LT", "SL", "SS", "ST", "SV", "UC", "UL", "US", "UT", "UV"}
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data
# Top-level values above this size are skipped by the parser (their offset and length are all that is needed).
_DEFER_SIZE = 64 * 1024
_ITEM, _SEQ_DELIMITER, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF

ElementPath = tuple[int, ...]  # tag, item index, tag, item index, ..., tag


@dataclass(frozen=True)
class BulkValue:
    """One element value in the file: where it is, and its raw bytes when it is to be inlined (short bulk values)."""

    path: ElementPath
    vr: str
    offset: int
    length: int
    raw: bytes | None = None

    @property
    def tag(self) -> int:
        return self.path[-1]


@dataclass(frozen=True)
class Located:
    """The values of a file that metadata names as bulk data, in file order (every value of a bulk VR, and values
    of the other VRs in :data:`URI_VRS` longer than the threshold), and the top-level pixel data element (``None``
    when there is none). Small enough to cache: no values are kept but the short bulk ones to inline."""

    transfer_syntax: UID
    values: list[BulkValue]
    pixel: BulkValue | None

    def find(self, path: ElementPath) -> BulkValue | None:
        if self.pixel is not None and self.pixel.path == path:
            return self.pixel
        return next((v for v in self.values if v.path == path), None)


def format_path(path: ElementPath) -> str:
    return "/".join(f"{part:08X}" if i % 2 == 0 else str(part) for i, part in enumerate(path))


def parse_path(text: str) -> ElementPath:
    """Parses ``TTTTTTTT[/index/TTTTTTTT...]``; raises ``ValueError`` with a message naming the problem."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 == 0:
        raise ValueError(
            f"The bulk data path '{text}' is invalid: it must be a tag, or tag/item/tag... ending with a tag "
            "(tags as 8 hexadecimal digits, items as 0-based numbers)."
        )
    path: list[int] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if len(part) != 8 or any(c not in "0123456789abcdefABCDEF" for c in part):
                raise ValueError(
                    f"The bulk data path '{text}' is invalid: '{part}' is not a tag of 8 hexadecimal digits."
                )
            path.append(int(part, 16))
        else:
            if not part.isdigit() or not part.isascii():
                raise ValueError(f"The bulk data path '{text}' is invalid: '{part}' is not a 0-based item number.")
            path.append(int(part))
    return tuple(path)


def inflated(f: BinaryIO) -> bytes:
    """A deflated file re-encoded as Explicit VR Little Endian: the same values, at offsets that can be read."""
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def locate(f: BinaryIO, threshold: int) -> Located:
    """The bulk values of the Part-10 file ``f`` (not deflated: offsets must be file offsets); ``threshold`` as in
    :func:`add_bulkdata`."""
    ds = pydicom.dcmread(f, stop_before_pixels=True, defer_size=max(_DEFER_SIZE, threshold))
    ts = UID(str(ds.file_meta.TransferSyntaxUID).rstrip("\0 "))
    pixel_at = f.tell()
    reader = _Reader(f, ts, threshold)
    values = list(reader.walk(ds, ()))
    return Located(ts, values, reader.pixel(pixel_at))


class _Reader:
    def __init__(self, f: BinaryIO, ts: UID, threshold: int) -> None:
        self.f = f
        self.threshold = threshold
        self.implicit = ts.is_implicit_VR
        self.little = ts.is_little_endian
        self.endian = "<" if self.little else ">"

    def walk(self, ds: Dataset, prefix: ElementPath) -> Iterator[BulkValue]:
        for tag in list(ds.keys()):
            tag = int(tag)
            if tag & 0xFFFF == 0:
                continue  # group lengths: left out of the JSON too
            elem = ds.get_item(tag)
            vr = self._vr(ds, tag, elem)
            if vr == "SQ":
                for index, item in enumerate(self._items(elem)):
                    yield from self.walk(item, (*prefix, tag, index))
            elif vr in URI_VRS and isinstance(elem, RawDataElement):
                length = elem.length
                if length == _UNDEFINED:
                    length = len(elem.value) if elem.value is not None else self._encapsulated_length(elem.value_tell)
                if vr in BULK_VRS or length > self.threshold:
                    inline = vr in BULK_VRS and length <= self.threshold
                    yield BulkValue((*prefix, tag), vr, elem.value_tell, length, elem.value if inline else None)

    def _vr(self, ds: Dataset, tag: int, elem: Any) -> str:
        """The element's VR: as written (explicit VR), else from the dictionaries; ambiguous and private ones are
        resolved by pydicom when the value is small enough to have been read."""
        if elem.VR is not None:
            return elem.VR
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
        if vr != "SQ" and elem.value is not None:
            try:
                return ds[tag].VR  # converts a small value; ``elem`` keeps its raw offset
            except Exception:  # a value pydicom cannot convert: the dictionary's VR will do
                pass
        return "OW" if "OW" in vr else vr.split(" or ")[0]

    def _items(self, elem: Any) -> list[Dataset]:
        """Items of a sequence, read from the file itself so that their elements' offsets are file offsets
        (pydicom parses a defined-length sequence from a copy of its bytes, with offsets relative to that copy)."""
        if not isinstance(elem, RawDataElement):
            return list(elem.value)  # undefined length: already parsed from the file
        self.f.seek(elem.value_tell)
        return list(read_sequence(self.f, self.implicit, self.little, elem.length, "iso8859"))

    def pixel(self, at: int) -> BulkValue | None:
        """The top-level pixel data element starting at ``at`` (where the parser stopped), if there is one."""
        self.f.seek(at)
        header = read_element_header(self.f, self.endian, self.implicit)
        if header is None or header[0] not in PIXEL_TAGS:
            return None
        tag, length = header
        value_at = self.f.tell()
        if not self.implicit:
            self.f.seek(at + 4)
            vr = self.f.read(2).decode("ascii", "replace")
        else:
            vr = "OB" if length == _UNDEFINED else dictionary_VR(tag).split(" or ")[-1]
        if length == _UNDEFINED:
            length = self._encapsulated_length(value_at)
        return BulkValue((tag,), vr, value_at, length)

    def _encapsulated_length(self, start: int) -> int:
        """Length of an undefined-length value made of items, up to (not including) its sequence delimiter."""
        f = self.f
        f.seek(start)
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("The encapsulated value has no sequence delimiter.")
            group, element, length = struct.unpack("<HHI", head)
            tag = group << 16 | element
            if tag == _SEQ_DELIMITER:
                return f.tell() - 8 - start
            if tag != _ITEM or length == _UNDEFINED:
                raise ValueError(f"The encapsulated value has an unexpected element ({tag:08X}) among its items.")
            f.seek(length, 1)


def add_bulkdata(
    document: dict[str, Any],
    located: Located,
    uri_of: Callable[[ElementPath], str],
    pixel_uri: str,
) -> dict[str, Any]:
    """Adds the located values to an instance's stored DICOM JSON (which has the bulk VRs left out), in place.

    Values of bulk VRs longer than the threshold of :func:`locate` become a BulkDataURI, shorter ones InlineBinary;
    values of the other VRs that may be bulk data and are longer than it have their Value replaced by a BulkDataURI.
    Elements that the stored JSON left out for other reasons (invalid values, an unreadable sequence) stay out. The
    top-level pixel data always points at ``pixel_uri``.
    """
    touched: dict[int, dict[str, Any]] = {}
    for value in located.values:
        node = _item(document, value.path[:-1])
        if node is None:
            continue
        key = f"{value.tag:08X}"
        if value.vr in BULK_VRS:
            node[key] = _bulk_json(value, uri_of)
        elif key in node:
            node[key] = {"vr": node[key].get("vr", value.vr), "BulkDataURI": uri_of(value.path)}
        else:
            continue
        touched[id(node)] = node
    if located.pixel is not None:
        document[f"{located.pixel.tag:08X}"] = {"vr": located.pixel.vr, "BulkDataURI": pixel_uri}
        touched[id(document)] = document
    for node in touched.values():
        ordered = sorted(node.items())
        node.clear()
        node.update(ordered)
    return document


def _bulk_json(value: BulkValue, uri_of: Callable[[ElementPath], str]) -> dict[str, Any]:
    if not value.length:
        return {"vr": value.vr}
    if value.raw is None:
        return {"vr": value.vr, "BulkDataURI": uri_of(value.path)}
    return {"vr": value.vr, "InlineBinary": base64.b64encode(value.raw).decode("ascii")}


def _item(document: dict[str, Any], prefix: ElementPath) -> dict[str, Any] | None:
    """The JSON object of the sequence item at ``prefix`` (tag, index, ...), or ``None`` when the JSON lacks it."""
    node = document
    for i in range(0, len(prefix), 2):
        element = node.get(f"{prefix[i]:08X}")
        items = element.get("Value") if isinstance(element, dict) else None
        if not isinstance(items, list) or prefix[i + 1] >= len(items) or not isinstance(items[prefix[i + 1]], dict):
            return None
        node = items[prefix[i + 1]]
    return node
