"""STOW: validate one spooled instance, make its file durable, then commit it to the index.

The order is fixed: reserve the UIDs (``creating`` row), write and fsync the file, then one transaction makes the
instance visible with its change-feed entry. A crash in between leaves only a ``creating`` row that the cleanup rolls
back; it never leaves a visible instance without its file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.dicom.frames import index_frames, number_of_frames
from dicomhub.dicom.json_model import dataset_to_json
from dicomhub.dicom.names import name_words
from dicomhub.dicom.tags import format_tag
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid, normalize_uid
from dicomhub.dicom.validation import dataset_errors, element_error, error_comment, values_of
from dicomhub.domain.attributes import (
    CORE_ATTRIBUTES,
    PATIENT_ID,
    REQUIRED_UIDS,
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


def blob_key(partition_key: int, study_uid: str, series_uid: str, sop_uid: str, watermark: int) -> str:
    return f"{partition_key}/{study_uid}/{series_uid}/{sop_uid}.{watermark}.dcm"


class StoreService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings

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
        ds, pixel_offset, size = _read_header(staged)
        result.sop_class_uid = _str(ds.get("SOPClassUID"))
        result.sop_uid = _str(ds.get("SOPInstanceUID"))
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
            if PATIENT_ID not in ds or not values_of(ds[PATIENT_ID]):
                result.comments.insert(
                    0, error_comment(PATIENT_ID, f"The required tag '{format_tag(PATIENT_ID)}' is missing.")
                )
        else:
            self._check_indexed_strict(ds)

        ts = UID(ds.file_meta.TransferSyntaxUID)
        if ts.is_implicit_VR:
            result.warning = DATASET_DOES_NOT_MATCH_SOP_CLASS
        elif lenient and result.comments:
            result.warning = VALIDATION_WARNING

        model, unconvertible = dataset_to_json(ds, skip=frozenset(dropped))
        study_values, series_values, multi = _indexed_values(ds, dropped | set(unconvertible))
        result.multiple_values_indexed = multi
        with open(staged, "rb") as f:
            frames = index_frames(f, pixel_offset, size, ds, ts) if "Rows" in ds else None

        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.stale_create_seconds)
        try:
            watermark = self.index.begin_create(partition.key, study_uid, series_uid, sop_uid, stale_before)
        except InstanceExists as exists:
            if exists.creating:
                raise _Rejected(INSTANCE_BEING_CREATED, "The instance is being created by another request.") from None
            raise _Rejected(INSTANCE_EXISTS, "The instance already exists; delete it first to replace it.") from None
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
                    frame_count=number_of_frames(ds) if "Rows" in ds else 0,
                    frames_json=json.dumps(frames, separators=(",", ":")) if frames else None,
                    metadata_json=json.dumps(model, separators=(",", ":"), ensure_ascii=False),
                    study_values=study_values,
                    series_values=series_values,
                    patient_name_words=name_words(_str(ds.get("PatientName"))) if 0x00100010 not in dropped else [],
                    referring_physician_words=(
                        name_words(_str(ds.get("ReferringPhysicianName"))) if 0x00080090 not in dropped else []
                    ),
                )
            )
        except BaseException:
            self.index.abort_create(watermark)
            self.blobs.delete(key)
            raise

    @staticmethod
    def _check_required(ds: Dataset, lenient: bool) -> None:
        comments = []
        for tag in REQUIRED_UIDS:
            elem = ds.get(tag)
            value = _str(elem.value) if elem is not None else ""
            if elem is None or not normalize_uid(value):
                comments.append(error_comment(tag, f"The required tag '{format_tag(tag)}' is missing."))
            elif not is_valid_uid(value.rstrip("\0") if lenient else value):
                comments.append(error_comment(tag, INVALID_UID_MESSAGE))
        if not lenient and (PATIENT_ID not in ds or not values_of(ds[PATIENT_ID])):
            comments.append(error_comment(PATIENT_ID, f"The required tag '{format_tag(PATIENT_ID)}' is missing."))
        elif lenient and PATIENT_ID in ds:
            message = element_error(ds[PATIENT_ID], trim_nul=True)
            if message:
                comments.append(error_comment(PATIENT_ID, message))
        if comments:
            raise _Rejected(VALIDATION_FAILURE, "A required attribute is missing or invalid.", comments)

    @staticmethod
    def _check_indexed_strict(ds: Dataset) -> None:
        """v1: every indexed attribute must be valid, NUL padding included, or the instance fails."""
        comments = []
        for attribute in CORE_ATTRIBUTES:
            elem = ds.get(attribute.tag)
            if elem is None:
                continue
            message = element_error(elem, trim_nul=False)
            if message:
                comments.append(error_comment(attribute.tag, message))
        if comments:
            raise _Rejected(VALIDATION_FAILURE, "An indexed attribute is invalid.", comments)


def _str(value) -> str:
    return "" if value is None else str(value)


def _read_header(staged: Path) -> tuple[Dataset, int, int]:
    """Zeroes the preamble, then parses everything before the pixel data; returns (dataset, pixel offset, size)."""
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
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        OSError,
        AttributeError,
        NotImplementedError,
    ) as exc:
        raise _Rejected(VALIDATION_FAILURE, f"The DICOM file could not be read: {exc}") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        raise _Rejected(VALIDATION_FAILURE, "The DICOM file has no file meta information (Transfer Syntax UID).")
    return ds, offset, size


def _indexed_values(ds: Dataset, skip: set[int]) -> tuple[dict[str, str | None], dict[str, str | None], bool]:
    """Folded values of the core indexed attributes; only the first of several values is indexed."""
    study_values: dict[str, str | None] = {}
    series_values: dict[str, str | None] = {}
    multiple = False
    for attribute in CORE_ATTRIBUTES:
        if attribute.column is None:
            continue
        target = study_values if attribute.level == STUDY else series_values
        elem = ds.get(attribute.tag)
        values = values_of(elem) if elem is not None and attribute.tag not in skip else []
        multiple |= len(values) > 1
        value = fold_value(attribute, str(values[0])) if values else ""
        target[attribute.column] = value or None
    return study_values, series_values, multiple
