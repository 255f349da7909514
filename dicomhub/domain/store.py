"""STOW: validate spooled instances, make their files durable, then commit them to the index.

The order is fixed: reserve the UIDs (``creating`` rows), write and fsync the files, then one transaction makes the
instances visible with their change-feed entries. A crash in between leaves only ``creating`` rows that the cleanup
rolls back (at start-up in the embedded mode, once older than ``DICOMHUB_STALE_CREATE_SECONDS`` otherwise); it never
leaves a visible instance without its file.

A file is refused (43264, Azure's validation failure for unreadable DICOM: spec 2.3) before anything is reserved
when it cannot be parsed, ends inside an element, item or sequence (an upload cut short), nests sequences deeper
than ``DICOMHUB_MAX_SEQUENCE_DEPTH``, or has an unknown transfer syntax. 272 (processing failure) is kept for what
goes wrong on the server's side: reading the spooled upload, writing the file, the index commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomhub.blobs.base import BlobStore, Staged
from dicomhub.config import Settings
from dicomhub.dicom.frames import ImageAttributeError, image_geometry, index_frames
from dicomhub.dicom.integrity import read_flat, structure_damage
from dicomhub.dicom.json_model import dataset_model, json_text
from dicomhub.dicom.tags import format_tag
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid, normalize_uid
from dicomhub.dicom.validation import (
    element_error,
    error_comment,
    invalid_character,
    pydicom_error,
    undecodable,
    values_of,
)
from dicomhub.domain.attributes import (
    CORE_ATTRIBUTES,
    PATIENT_ID,
    REQUIRED_UIDS,
    SERIES_UID,
    SOP_CLASS_UID,
    SOP_UID,
    STUDY_UID,
    indexed_values,
)
from dicomhub.domain.extended_tags import index_created
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

_UNCHECKED = frozenset(REQUIRED_UIDS)  # checked by _check_required, with their own messages
_REQUIRED = (*REQUIRED_UIDS, PATIENT_ID)
BATCH_SIZE = 64  # instances committed together; bounds the transaction and the prepared metadata held in memory
STUDY_MISMATCH = "The StudyInstanceUid in the payload does not match the specified StudyInstanceUid."
INSTANCE_EXISTS_DETAIL = "The instance already exists; delete it first to replace it."
BEING_CREATED_DETAIL = "The instance is being created by another request."


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

    def reject(self, rejected: _Rejected) -> None:
        self.failure, self.detail, self.comments = rejected.reason, rejected.detail, rejected.comments


class _Rejected(Exception):
    def __init__(self, reason: int, detail: str, comments: list[str] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.comments = comments or []


def blob_key(partition_key: int, study_uid: str, series_uid: str, sop_uid: str, watermark: int) -> str:
    return f"{partition_key}/{study_uid}/{series_uid}/{sop_uid}.{watermark}.dcm"


@dataclass
class _Prepared:
    """A validated file waiting to be reserved, written and committed."""

    staged: Staged
    result: StoreResult
    instance: NewInstance

    @property
    def uids(self) -> tuple[str, str, str]:
        return self.instance.study_uid, self.instance.series_uid, self.instance.sop_uid


class StoreService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings

    def store(
        self, partition: Partition, staged: Staged, api_version: int, study_uid_in_path: str | None
    ) -> StoreResult:
        """Stores one spooled file (consumed either way) and reports the outcome."""
        return self.store_many(partition, [staged], api_version, study_uid_in_path)[0]

    def store_many(
        self, partition: Partition, staged: list[Staged], api_version: int, study_uid_in_path: str | None
    ) -> list[StoreResult]:
        """Stores the spooled files of one request (each consumed either way); one outcome per file, in order.

        The files are validated one by one, then reserved together, written, and committed in one transaction per
        batch of ``BATCH_SIZE``: a request of 50 instances costs two commits, not a hundred.
        """
        results: list[StoreResult] = []
        for start in range(0, len(staged), BATCH_SIZE):
            results.extend(
                self._store_batch(partition, staged[start : start + BATCH_SIZE], api_version, study_uid_in_path)
            )
        return results

    def _store_batch(
        self, partition: Partition, staged: list[Staged], api_version: int, study_uid_in_path: str | None
    ) -> list[StoreResult]:
        results: list[StoreResult] = []
        ready: list[_Prepared] = []
        try:
            for upload in staged:
                result = StoreResult()
                results.append(result)
                try:
                    ready.append(self._prepare(partition, upload, api_version, study_uid_in_path, result))
                except _Rejected as rejected:
                    result.reject(rejected)
                    self.blobs.discard(upload)
                except Exception:
                    log.exception("store failed", extra={"sop_uid": result.sop_uid})
                    result.reject(_Rejected(PROCESSING_FAILURE, "processing failure"))
                    self.blobs.discard(upload)
            self._commit(partition, ready)
        finally:
            for item in ready:
                self.blobs.discard(item.staged)
        return results

    def _commit(self, partition: Partition, ready: list[_Prepared]) -> None:
        """Reserve, write durably, then make visible; a failure of the last step fails the whole batch (272)."""
        if not ready:
            return
        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.stale_create_seconds)
        reservations = self.index.begin_creates(partition.key, [p.uids for p in ready], stale_before)
        seen: set[tuple[str, str, str]] = set()
        reserved: list[_Prepared] = []
        for item, reservation in zip(ready, reservations, strict=True):
            if isinstance(reservation, InstanceExists):
                if not reservation.creating or item.uids in seen:  # a twin earlier in this request exists now
                    item.result.reject(_Rejected(INSTANCE_EXISTS, INSTANCE_EXISTS_DETAIL))
                else:
                    item.result.reject(_Rejected(INSTANCE_BEING_CREATED, BEING_CREATED_DETAIL))
                continue
            seen.add(item.uids)
            item.instance.watermark = reservation
            item.instance.blob_key = blob_key(partition.key, *item.uids, reservation)
            reserved.append(item)
        try:
            self.blobs.put_many([(item.instance.blob_key, item.staged) for item in reserved])
            self.index.complete_creates([item.instance for item in reserved], index_created)
        except Exception:
            log.exception("store commit failed", extra={"count": len(reserved)})
            self.index.abort_creates([item.instance.watermark for item in reserved])
            for item in reserved:  # any may have been written (keys are the reservations': no one else's)
                try:
                    self.blobs.delete(item.instance.blob_key)
                except Exception:  # a store that refused the write may refuse this too: an orphan at worst
                    log.warning("blob not removed", extra={"key": item.instance.blob_key}, exc_info=True)
            for item in reserved:
                item.result.reject(_Rejected(PROCESSING_FAILURE, "processing failure"))

    def _prepare(
        self, partition: Partition, staged: Staged, api_version: int, path_study: str | None, result: StoreResult
    ) -> _Prepared:
        staged.zero_preamble()
        with staged.open() as f:
            try:
                return self._prepare_open(partition, staged, f, api_version, path_study, result)
            except _Rejected:
                raise
            except Exception as exc:  # pydicom raises anything on bytes it cannot interpret: the upload's fault
                log.warning("unreadable upload", extra={"sop_uid": result.sop_uid}, exc_info=True)
                raise _Rejected(VALIDATION_FAILURE, _unreadable(exc)) from None

    def _prepare_open(
        self,
        partition: Partition,
        staged: Staged,
        f: BinaryIO,
        api_version: int,
        path_study: str | None,
        result: StoreResult,
    ) -> _Prepared:
        lenient = api_version >= 2
        ds, pixel_offset, size, raw_nul = _read_header(
            f, self.settings.max_sequence_depth, self.settings.max_transcode_size, nul_tags=not lenient
        )
        required = {tag: _element(ds, tag) for tag in _REQUIRED}  # each decoded once, used thrice
        result.sop_class_uid = _text(required[SOP_CLASS_UID])
        result.sop_uid = _text(required[SOP_UID])

        self._check_required(required, lenient)
        study_uid, series_uid, sop_uid = (normalize_uid(_text(required[t])) for t in (STUDY_UID, SERIES_UID, SOP_UID))
        result.study_uid, result.series_uid = study_uid, series_uid
        if path_study is not None and normalize_uid(path_study) != study_uid:
            raise _Rejected(VALIDATION_FAILURE, STUDY_MISMATCH, [error_comment(STUDY_UID, STUDY_MISMATCH)])

        if lenient:  # invalid attributes become warnings and are left out of the model
            model, errors, _ = dataset_model(ds, validate=True, trim_nul=True, unchecked=_UNCHECKED)
            result.comments.extend(error_comment(tag, msg) for tag, msg in errors.items())
            if not _text(required[PATIENT_ID]):
                result.comments.insert(
                    0, error_comment(PATIENT_ID, f"The required tag '{format_tag(PATIENT_ID)}' is missing.")
                )
        else:
            self._check_indexed_strict(ds, raw_nul)
            model, _, _ = dataset_model(ds, validate=False)

        ts = UID(ds.file_meta.TransferSyntaxUID)
        if ts.is_implicit_VR:
            result.warning = DATASET_DOES_NOT_MATCH_SOP_CLASS
        elif lenient and result.comments:
            result.warning = VALIDATION_WARNING

        values, result.multiple_values_indexed = indexed_values(model)
        frames, frame_count = None, 0
        if "Rows" in ds:
            try:
                frame_count = image_geometry(ds).frames
            except ImageAttributeError:  # kept (v2 warns about the value); retrieving its pixels is a 406 naming it
                frame_count = 1
            frames = index_frames(f, pixel_offset, size, ds, ts)
        instance = NewInstance(
            partition_key=partition.key,
            watermark=0,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=normalize_uid(result.sop_class_uid or ""),
            transfer_syntax_uid=str(ts),
            blob_key="",
            file_size=size,
            frame_count=frame_count,
            frames_json=json_text(frames) if frames else None,
            metadata_json=json_text(model),
            values=values,
        )
        return _Prepared(staged, result, instance)

    @staticmethod
    def _check_required(required: dict[int, tuple[DataElement | None, Exception | None]], lenient: bool) -> None:
        """The required UIDs and the patient ID, as :func:`_element` found each."""
        comments = []
        for tag in REQUIRED_UIDS:
            elem, failure = required[tag]
            if failure is not None:
                comments.append(error_comment(tag, undecodable(tag, failure)))
                continue
            value = _str(elem.value) if elem is not None else ""
            if elem is None or not normalize_uid(value):
                comments.append(error_comment(tag, f"The required tag '{format_tag(tag)}' is missing."))
            elif not is_valid_uid(value.rstrip("\0") if lenient else value):
                comments.append(error_comment(tag, INVALID_UID_MESSAGE))
        patient_id, failure = required[PATIENT_ID]
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


def _text(found: tuple[DataElement | None, Exception | None]) -> str:
    """An element's value (as :func:`_element` found it) as text; empty when absent or undecodable."""
    elem, _ = found
    return "" if elem is None or elem.value is None else str(elem.value)


def _unreadable(exc: Exception) -> str:
    return f"The DICOM file could not be read: {pydicom_error(exc)}"


def _read_header(
    f: BinaryIO, max_depth: int, max_inflated: int, nul_tags: bool = True
) -> tuple[Dataset, int, int, set[int]]:
    """Checks the file's structure (:func:`structure_damage`), then parses everything before the pixel data.

    Returns (dataset, pixel offset, size, tags of strictly validated attributes whose raw value holds a NUL: only
    v1 needs them, the empty set unless ``nul_tags``).
    """
    size = f.seek(0, 2)
    try:
        flat = read_flat(f, size)  # the common upload, checked and read in one pass
    except Exception:  # whatever it is, the usual path names it
        flat = None
    if flat is not None:
        ds, offset = flat
    else:
        damage = structure_damage(f, size, max_depth, max_inflated)
        if damage is not None:
            comment = error_comment(damage.tag, damage.message[:1].upper() + damage.message[1:])
            kind = "is truncated" if damage.truncated else "cannot be stored"
            raise _Rejected(VALIDATION_FAILURE, f"The DICOM file {kind}: {damage.message}", [comment])
        f.seek(0)
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            offset = f.tell()
        except Exception as exc:  # whatever else stops the parser (bad lengths, bad VRs) makes it unreadable
            raise _Rejected(VALIDATION_FAILURE, _unreadable(exc)) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise _Rejected(VALIDATION_FAILURE, "The DICOM file has no file meta information (Transfer Syntax UID).")
    ts = UID(str(ds.file_meta.TransferSyntaxUID).rstrip("\0 "))
    if not ts.is_transfer_syntax:
        message = f"The transfer syntax '{ts}' is not a known transfer syntax."
        raise _Rejected(VALIDATION_FAILURE, message, [error_comment(0x00020010, message)])
    return ds, offset, size, _raw_nul_tags(ds) if nul_tags else set()


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
