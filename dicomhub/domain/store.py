"""STOW: validate one spooled instance, make its file durable, then commit it to the index.

The order is fixed: reserve the UIDs (``creating`` row), write and fsync the file, then one transaction makes the
instance visible with its change-feed entry. A crash in between leaves only a ``creating`` row that the cleanup rolls
back; it never leaves a visible instance without its file. On PostgreSQL a store also holds an advisory lock on the
instance's UIDs (:class:`CreateGuard`), so a re-store recognises a crashed writer's row at once and takes it over.

A file is refused (43264) before anything is reserved when it cannot be parsed, ends inside an element (an upload
cut short), or has an unknown transfer syntax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import Engine, create_engine, text

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.dicom.frames import index_frames, number_of_frames
from dicomhub.dicom.json_model import dataset_to_json
from dicomhub.dicom.names import name_words
from dicomhub.dicom.tags import format_tag
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid, normalize_uid
from dicomhub.dicom.validation import (
    dataset_errors,
    element_error,
    error_comment,
    invalid_character,
    undecodable,
    values_of,
)
from dicomhub.domain.attributes import (
    CORE_ATTRIBUTES,
    PATIENT_ID,
    REQUIRED_UIDS,
    SOP_CLASS_UID,
    SOP_UID,
    STUDY,
    STUDY_UID,
    fold_value,
)
from dicomhub.index.records import NewInstance, Partition
from dicomhub.index.repository import Index, InstanceExists

log = logging.getLogger(__name__)

# DICOM failure and warning reasons (PS3.4 and Azure's own codes)
PROCESSING_FAILURE = 272
VALIDATION_FAILURE = 43264
INSTANCE_EXISTS = 45070
INSTANCE_BEING_CREATED = 45071
DATASET_DOES_NOT_MATCH_SOP_CLASS = 45063
VALIDATION_WARNING = 1

STUDY_MISMATCH = "The StudyInstanceUid in the payload does not match the specified StudyInstanceUid."


@dataclass
class StoreResult:
    """The outcome of one instance: a failure reason, or success with an optional warning reason."""

    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    warning: int | None = None
    comments: list[str] = field(default_factory=list)
    multiple_values_indexed: bool = False
    detail: str = ""

    @property
    def stored(self) -> bool:
        return self.failure is None


class _Rejected(Exception):
    def __init__(self, reason: int, detail: str, comments: list[str] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.comments = comments or []


class CreateGuard:
    """Tells a live store of an instance from one that a crash cut short.

    PostgreSQL: a session-level advisory lock keyed by the instance's UIDs, taken on a connection of its own before
    the ``creating`` row is written and released after the store commits or aborts. The database drops the lock
    as soon as the holder's connection dies (process killed, host gone), so whoever can take the lock while a
    ``creating`` row exists knows that row's writer is dead. Several server processes may share the database.

    SQLite is single-process: the server rolls back every ``creating`` row at start-up, so no lock is needed.
    """

    def __init__(self, index: Index) -> None:
        self.detects_crashed_owners = index.dialect == "postgresql"
        # A pool of its own: a store holds its lock connection while it waits for index connections, so sharing the
        # index pool could exhaust it with lock holders.
        self._engine: Engine | None = (
            create_engine(index.engine.url, pool_size=4, max_overflow=64, pool_pre_ping=True)
            if self.detects_crashed_owners
            else None
        )

    @staticmethod
    def lock_key(partition_key: int, study_uid: str, series_uid: str, sop_uid: str) -> int:
        digest = hashlib.blake2b(f"{partition_key}/{study_uid}/{series_uid}/{sop_uid}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big", signed=True)

    @contextmanager
    def hold(self, partition_key: int, study_uid: str, series_uid: str, sop_uid: str) -> Iterator[bool]:
        """Yields whether this process now exclusively stores the instance (``False``: another live store does)."""
        if self._engine is None:
            yield True
            return
        key = self.lock_key(partition_key, study_uid, series_uid, sop_uid)
        conn = self._engine.connect()
        acquired = False
        try:
            acquired = bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            conn.commit()
            yield acquired
        finally:
            try:
                if acquired:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()
            except Exception:
                log.warning("advisory unlock failed; dropping the connection releases it", exc_info=True)
                conn.invalidate()
            finally:
                conn.close()


def blob_key(partition_key: int, study_uid: str, series_uid: str, sop_uid: str, watermark: int) -> str:
    return f"{partition_key}/{study_uid}/{series_uid}/{sop_uid}.{watermark}.dcm"


class StoreService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings
        self.guard = CreateGuard(index)

    def store(self, partition: Partition, staged: Path, api_version: int, study_uid_in_path: str | None) -> StoreResult:
        """Stores the spooled file ``staged`` (consumed either way) and reports the outcome."""
        result = StoreResult()
        try:
            self._store(partition, staged, api_version, study_uid_in_path, result)
        except _Rejected as rejected:
            result.failure, result.detail = rejected.reason, rejected.detail
            result.comments = rejected.comments
        except Exception:
            log.exception("store failed", extra={"sop_uid": result.sop_uid})
            result.failure, result.detail = PROCESSING_FAILURE, "processing failure"
        finally:
            self.blobs.discard_staging(staged)
        return result

    def _store(self, partition: Partition, staged: Path, api_version: int, path_study: str | None, result: StoreResult):
        ds, pixel_offset, size, raw_nul = _read_header(staged)
        result.sop_class_uid = _text(ds, SOP_CLASS_UID)
        result.sop_uid = _text(ds, SOP_UID)
        lenient = api_version >= 2

        self._check_required(ds, lenient)
        study_uid = normalize_uid(_str(ds.StudyInstanceUID))
        series_uid = normalize_uid(_str(ds.SeriesInstanceUID))
        sop_uid = normalize_uid(_str(ds.SOPInstanceUID))
        result.study_uid, result.series_uid = study_uid, series_uid
        if path_study is not None and normalize_uid(path_study) != study_uid:
            raise _Rejected(VALIDATION_FAILURE, STUDY_MISMATCH, [error_comment(STUDY_UID, STUDY_MISMATCH)])

        dropped: set[int] = set()
        if lenient:
            errors = dataset_errors(ds, trim_nul=True, skip=frozenset(REQUIRED_UIDS))
            dropped = set(errors)
            result.comments.extend(error_comment(tag, msg) for tag, msg in errors.items())
            if PATIENT_ID not in ds or not _text(ds, PATIENT_ID):
                result.comments.insert(
                    0, error_comment(PATIENT_ID, f"The required tag '{format_tag(PATIENT_ID)}' is missing.")
                )
        else:
            self._check_indexed_strict(ds, raw_nul)

        ts = UID(ds.file_meta.TransferSyntaxUID)
        if ts.is_implicit_VR:
            result.warning = DATASET_DOES_NOT_MATCH_SOP_CLASS
        elif lenient and result.comments:
            result.warning = VALIDATION_WARNING

        model, unconvertible = dataset_to_json(ds, skip=frozenset(dropped))
        study_values, series_values, multi = _indexed_values(ds, dropped | set(unconvertible))
        result.multiple_values_indexed = multi
        frames, frame_count = None, 0
        if "Rows" in ds:
            try:  # frame ranges only speed up frame retrieval: a damaged image attribute must not fail the store
                frame_count = number_of_frames(ds)
                with open(staged, "rb") as f:
                    frames = index_frames(f, pixel_offset, size, ds, ts)
            except Exception:
                log.warning("pixel data could not be indexed", extra={"sop_uid": sop_uid}, exc_info=True)
                frames, frame_count = None, frame_count or 1

        with self.guard.hold(partition.key, study_uid, series_uid, sop_uid) as exclusive:
            if not exclusive:
                raise _Rejected(INSTANCE_BEING_CREATED, "The instance is being created by another request.")
            watermark = self._reserve(partition.key, study_uid, series_uid, sop_uid)
            key = blob_key(partition.key, study_uid, series_uid, sop_uid, watermark)
            try:
                self.blobs.put_file(key, staged)
                self.index.complete_create(
                    NewInstance(
                        partition_key=partition.key,
                        watermark=watermark,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=sop_uid,
                        sop_class_uid=normalize_uid(result.sop_class_uid or ""),
                        transfer_syntax_uid=str(ts),
                        blob_key=key,
                        file_size=size,
                        frame_count=frame_count,
                        frames_json=json.dumps(frames, separators=(",", ":")) if frames else None,
                        metadata_json=json.dumps(model, separators=(",", ":"), ensure_ascii=False),
                        study_values=study_values,
                        series_values=series_values,
                        patient_name_words=name_words(_text(ds, 0x00100010)) if 0x00100010 not in dropped else [],
                        referring_physician_words=(
                            name_words(_text(ds, 0x00080090)) if 0x00080090 not in dropped else []
                        ),
                    )
                )
            except BaseException:
                self.index.abort_create(watermark)
                self.blobs.delete(key)
                raise

    def _reserve(self, partition_key: int, study_uid: str, series_uid: str, sop_uid: str) -> int:
        """The ``creating`` row for the UIDs; called while holding the instance's create guard.

        A ``creating`` row found while we hold the guard cannot belong to a live store (every store holds the guard
        from before it reserves until it commits or aborts): it was left by a process that crashed in between, so it
        is rolled back and the reservation retried at once, instead of blocking re-stores until it goes stale.
        """
        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.stale_create_seconds)
        for attempt in (1, 2):
            try:
                return self.index.begin_create(partition_key, study_uid, series_uid, sop_uid, stale_before)
            except InstanceExists as exists:
                if not exists.creating:
                    raise _Rejected(
                        INSTANCE_EXISTS, "The instance already exists; delete it first to replace it."
                    ) from None
                if attempt == 2 or not self.guard.detects_crashed_owners:
                    raise _Rejected(
                        INSTANCE_BEING_CREATED, "The instance is being created by another request."
                    ) from None
                self._roll_back_crashed_create(partition_key, study_uid, series_uid, sop_uid)
        raise AssertionError("unreachable")

    def _roll_back_crashed_create(self, partition_key: int, study_uid: str, series_uid: str, sop_uid: str) -> None:
        for row in self.index.stale_creates(datetime.now(UTC) + timedelta(days=1)):
            if (row.partition_key, row.study_uid, row.series_uid, row.sop_uid) == (
                partition_key,
                study_uid,
                series_uid,
                sop_uid,
            ):
                log.warning("rolling back a store left unfinished by a crash", extra={"sop_uid": sop_uid})
                self.blobs.delete(
                    blob_key(row.partition_key, row.study_uid, row.series_uid, row.sop_uid, row.watermark)
                )
                self.index.abort_create(row.watermark)

    @staticmethod
    def _check_required(ds: Dataset, lenient: bool) -> None:
        comments = []
        for tag in REQUIRED_UIDS:
            elem, failure = _element(ds, tag)
            if failure is not None:
                comments.append(error_comment(tag, undecodable(tag, failure)))
                continue
            value = _str(elem.value) if elem is not None else ""
            if elem is None or not normalize_uid(value):
                comments.append(error_comment(tag, f"The required tag '{format_tag(tag)}' is missing."))
            elif not is_valid_uid(value.rstrip("\0") if lenient else value):
                comments.append(error_comment(tag, INVALID_UID_MESSAGE))
        patient_id, failure = _element(ds, PATIENT_ID)
        if failure is not None:
            comments.append(error_comment(PATIENT_ID, undecodable(PATIENT_ID, failure)))
        elif not lenient and (patient_id is None or not values_of(patient_id)):
            comments.append(error_comment(PATIENT_ID, f"The required tag '{format_tag(PATIENT_ID)}' is missing."))
        elif lenient and patient_id is not None:
            message = element_error(patient_id, trim_nul=True)
            if message:
                comments.append(error_comment(PATIENT_ID, message))
        if comments:
            raise _Rejected(VALIDATION_FAILURE, "A required attribute is missing or invalid.", comments)

    @staticmethod
    def _check_indexed_strict(ds: Dataset, raw_nul: set[int]) -> None:
        """v1: every indexed attribute must be valid, NUL padding included, or the instance fails."""
        comments = []
        for attribute in CORE_ATTRIBUTES:
            elem, failure = _element(ds, attribute.tag)
            if failure is not None:
                comments.append(error_comment(attribute.tag, undecodable(attribute.tag, failure)))
                continue
            if elem is None:
                continue
            if attribute.tag in raw_nul:
                message = invalid_character(attribute.keyword, elem.VR)
            else:
                message = element_error(elem, trim_nul=False)
            if message:
                comments.append(error_comment(attribute.tag, message))
        if comments:
            raise _Rejected(VALIDATION_FAILURE, "An indexed attribute is invalid.", comments)


def _str(value) -> str:
    return "" if value is None else str(value)


def _element(ds: Dataset, tag: int) -> tuple[DataElement | None, Exception | None]:
    """(element or None when absent, None) or (None, the error) when its raw value cannot be decoded."""
    try:
        return ds.get(tag), None
    except Exception as exc:
        return None, exc


def _text(ds: Dataset, tag: int) -> str:
    """The element's value as text; empty when absent or undecodable."""
    elem, _ = _element(ds, tag)
    return "" if elem is None or elem.value is None else str(elem.value)


def _read_header(staged: Path) -> tuple[Dataset, int, int, set[int]]:
    """Zeroes the preamble, then parses everything before the pixel data.

    Returns (dataset, pixel offset, size, tags of strictly validated attributes whose raw value holds a NUL).
    """
    try:
        with open(staged, "r+b") as f:
            head = f.read(132)
            if len(head) == 132 and head[128:132] == b"DICM" and head[:128] != bytes(128):
                f.seek(0)
                f.write(bytes(128))
            f.seek(0)
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            offset = f.tell()
            f.seek(0, 2)
            size = f.tell()
    except Exception as exc:  # whatever stops the parser (bad lengths, bad VRs, truncation) makes it unreadable
        raise _Rejected(VALIDATION_FAILURE, f"The DICOM file could not be read: {exc}") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise _Rejected(VALIDATION_FAILURE, "The DICOM file has no file meta information (Transfer Syntax UID).")
    ts = UID(str(ds.file_meta.TransferSyntaxUID).rstrip("\0 "))
    if not ts.is_transfer_syntax:
        message = f"The transfer syntax '{ts}' is not a known transfer syntax."
        raise _Rejected(VALIDATION_FAILURE, message, [error_comment(0x00020010, message)])
    cut = _truncation(staged, ds, offset, size)
    if cut is not None:
        tag, message = cut
        comment = error_comment(tag, message[:1].upper() + message[1:])
        raise _Rejected(VALIDATION_FAILURE, f"The DICOM file is truncated: {message}", [comment])
    return ds, offset, size, _raw_nul_tags(ds)


_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_DELIMITER, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def _element_header(f, endian: str, implicit: bool) -> tuple[int, int] | None:
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


def _truncation(staged: Path, ds: Dataset, offset: int, size: int) -> tuple[int, str] | None:
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
        with open(staged, "rb") as f:
            f.seek(offset)
            return _follow_elements(f, size, endian, ts.is_implicit_VR)
    last = max(ds.elements(), key=lambda e: getattr(e, "value_tell", None) or getattr(e, "file_tell", 0), default=None)
    if last is None:
        return None
    tag = int(last.tag)
    if getattr(last, "is_undefined_length", False) or getattr(last, "length", 0) == _UNDEFINED:
        with open(staged, "rb") as f:
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
        header = _element_header(f, endian, implicit)
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


def _raw_nul_tags(ds: Dataset) -> set[int]:
    """Indexed text attributes whose value as sent contains a NUL byte, trailing padding included.

    pydicom strips trailing NULs when it decodes a value, so v1's strict check must look at the raw bytes before
    anything reads the element. UIDs are NUL-padded by the standard and are not reported.
    """
    found: set[int] = set()
    for attribute in CORE_ATTRIBUTES:
        if attribute.vr == "UI" or attribute.tag not in ds:
            continue
        raw = ds.get_item(attribute.tag)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes | bytearray) and b"\0" in bytes(value).rstrip(b" "):
            found.add(attribute.tag)
    return found


def _indexed_values(ds: Dataset, skip: set[int]) -> tuple[dict[str, str | None], dict[str, str | None], bool]:
    """Folded values of the core indexed attributes; only the first of several values is indexed."""
    study_values: dict[str, str | None] = {}
    series_values: dict[str, str | None] = {}
    multiple = False
    for attribute in CORE_ATTRIBUTES:
        if attribute.column is None:
            continue
        target = study_values if attribute.level == STUDY else series_values
        elem = _element(ds, attribute.tag)[0] if attribute.tag not in skip else None
        values = values_of(elem) if elem is not None else []
        multiple |= len(values) > 1
        value = fold_value(attribute, str(values[0])) if values else ""
        target[attribute.column] = value or None
    return study_values, series_values, multiple
