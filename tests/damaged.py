"""Damaged DICOM files made byte by byte (pydicom will not write an unknown VR or a length that lies), and the
checks the damaged-file and fuzz tests share."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import httpx
from pydicom.dataset import FileDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID

from tests.factory import to_bytes

DICOM_JSON = "application/dicom+json"
SINGLE = {"Accept": DICOM_JSON, "Content-Type": "application/dicom"}
VALIDATION_FAILURE = 43264
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
UNDEFINED = 0xFFFFFFFF


def element(tag: int, vr: bytes, value: bytes, length: int | None = None, endian: str = "<") -> bytes:
    """One explicit VR element; ``length`` overrides the value's real length (to lie about it)."""
    length = len(value) if length is None else length
    head = struct.pack(endian + "HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in _LONG_VRS:
        return head + b"\0\0" + struct.pack(endian + "I", length) + value
    return head + struct.pack(endian + "H", length) + value


def item(content: bytes, undefined: bool = False, endian: str = "<") -> bytes:
    if undefined:
        return (
            struct.pack(endian + "HHI", 0xFFFE, 0xE000, UNDEFINED)
            + content
            + struct.pack(endian + "HHI", 0xFFFE, 0xE00D, 0)
        )
    return struct.pack(endian + "HHI", 0xFFFE, 0xE000, len(content)) + content


def sequence(tag: int, items: list[bytes], undefined: bool = False, endian: str = "<") -> bytes:
    value = b"".join(items)
    if undefined:
        delimiter = struct.pack(endian + "HHI", 0xFFFE, 0xE0DD, 0)
        return element(tag, b"SQ", value + delimiter, length=UNDEFINED, endian=endian)
    return element(tag, b"SQ", value, endian=endian)


def nested_sequences(depth: int, undefined: bool = False, tag: int = 0x0040A730) -> bytes:
    """A sequence element holding one item holding a sequence ... ``depth`` sequences deep."""
    content = element(0x0040A160, b"UT", b"innermost ")
    for _ in range(depth):
        content = sequence(tag, [item(content, undefined)], undefined)
    return content


def splice(ds: FileDataset, tag: int, raw: bytes) -> bytes:
    """``ds`` as a Part-10 file with the top-level element ``tag`` replaced by the bytes ``raw`` (removed when
    empty), in its place in tag order. The element is written as an OB placeholder first and then swapped."""
    marker = b"splice-" + f"{tag:08x}".encode() + b"!"
    ds.add_new(tag, "OB", marker)
    data = part10(ds)
    endian = "<" if UID(ds.file_meta.TransferSyntaxUID).is_little_endian else ">"
    placeholder = element(tag, b"OB", marker, endian=endian)
    assert data.count(placeholder) == 1
    return data.replace(placeholder, raw)


def part10(ds: FileDataset) -> bytes:
    """``ds`` as a Part-10 file in its transfer syntax, big endian included (pixel values are not swapped)."""
    if UID(ds.file_meta.TransferSyntaxUID).is_little_endian:
        return to_bytes(ds)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    return buffer.getvalue()


def failure(response: httpx.Response) -> tuple[int, list[str]]:
    """(failure reason, error comments) of a STOW answer that refused its one instance."""
    assert response.status_code == 409, (response.status_code, response.text)
    (failed,) = response.json()["00081198"]["Value"]
    comments = [c["00000902"]["Value"][0] for c in failed.get("00741048", {}).get("Value", [])]
    return failed["00081197"]["Value"][0], comments


def stored_urls(response: httpx.Response) -> list[str]:
    """RetrieveURLs of the instances a STOW answer stored."""
    return [i["00081190"]["Value"][0] for i in response.json().get("00081199", {}).get("Value", [])]


def assert_4xx_message(response: httpx.Response, *statuses: int) -> None:
    """A 4xx (one of ``statuses`` when given) with a non-empty plain-text reason."""
    assert 400 <= response.status_code < 500, (response.request.url, response.status_code, response.text[:500])
    if statuses:
        assert response.status_code in statuses, (response.request.url, response.status_code, response.text[:500])
    assert response.text.strip(), f"{response.request.url}: an empty {response.status_code}"
    assert response.headers["content-type"].startswith("text/plain"), response.headers["content-type"]


def rss_kib(pid: int) -> int:
    """Resident memory of a process (psutil is not installed: /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
