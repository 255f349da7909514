"""Bulk update (``POST /v2/studies/$bulkUpdate``): patient and study attributes of whole studies changed in place.

The request is validated here (Azure's rules: at most 50 studies, 36 updatable top-level attributes, valid values)
and becomes an ``update`` operation, one task per study. A task rewrites each instance: the header is re-encoded
with the change applied and a new file meta implementation; everything from the pixel data on is copied byte for
byte, never decoded. Each batch of new files is made durable, then committed in one transaction (instance row,
metadata, study/series values, name words, change feed). The first update of an instance keeps its original; a
later one replaces the intermediate version. Tasks are idempotent: an instance already updated by the operation
(``updated_by``) is skipped when a task cut short by a crash runs again.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import Connection

from dicomhub import __version__
from dicomhub.blobs.base import MEMORY_PART_LIMIT, BlobStore, Staged
from dicomhub.config import Settings
from dicomhub.dicom.frames import index_frames
from dicomhub.dicom.json_model import dataset_to_json, element_to_json
from dicomhub.dicom.tags import tag_key
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid, normalize_uid
from dicomhub.dicom.validation import element_error, error_comment
from dicomhub.domain.attributes import indexed_values
from dicomhub.domain.errors import BodySyntaxInvalid, InvalidRequest
from dicomhub.domain.extended_tags import extract_values
from dicomhub.domain.operations import Operation, OperationService, OperationStatus, OperationType, TaskLease
from dicomhub.domain.store import blob_key
from dicomhub.index.extended_tags import indexing_tags, write_instance_values
from dicomhub.index.records import Partition
from dicomhub.index.repository import Index
from dicomhub.index.updates import NewVersion, Reservation, UpdateCandidate, UpdateIndex

log = logging.getLogger(__name__)

MAX_STUDIES = 50
BATCH_SIZE = 32  # instances written, then committed together
IMPLEMENTATION_CLASS_UID = "1.3.6.1.4.1.311.129"  # Azure's: clients may tell an updated file by it
IMPLEMENTATION_VERSION_NAME = f"dicomhub-{__version__}"[:16]  # SH: at most 16 characters
PATIENT_NAME, REFERRING_PHYSICIAN_NAME, SPECIFIC_CHARACTER_SET = 0x00100010, 0x00080090, 0x00080005
UTF8 = "ISO_IR 192"
FAILED_ATTRIBUTES_SEQUENCE, ERROR_COMMENT = 0x00741048, 0x00000902

# Azure's updatable attributes: patient identification/demographics and three study attributes (top level only)
UPDATABLE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "TypeOfPatientID",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "PatientAge",
    "Occupation",
    "ConfidentialityConstraintOnPatientDataDescription",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "QualityControlSubject",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "MilitaryRank",
    "BranchOfService",
    "CountryOfResidence",
    "RegionOfResidence",
    "PatientTelephoneNumbers",
    "EthnicGroup",
    "PatientReligiousPreference",
    "PatientComments",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "BreedRegistrationNumber",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
UPDATABLE_TAGS = frozenset(int(pydicom.datadict.tag_for_keyword(k)) for k in UPDATABLE_KEYWORDS)

NOT_UPDATABLE = "Updating the tag is not supported"
_TAG_KEY = re.compile(r"[0-9A-Fa-f]{8}")
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_NUMBER_VRS = ("DS", "IS")  # JSON numbers, or strings as pydicom and fo-dicom also read them
EMPTY_NOT_SUPPORTED = "Updating the tag to an empty value is not supported"


class ChangeDatasetInvalid(InvalidRequest):
    """Attributes of the change dataset that cannot be applied; answered as a DICOM JSON dataset whose Failed
    Attributes Sequence holds one Error Comment per problem (Azure's form)."""

    def __init__(self, comments: list[str]) -> None:
        super().__init__("; ".join(comments))
        self.comments = comments

    def dataset(self) -> dict[str, Any]:
        items = [{tag_key(ERROR_COMMENT): {"vr": "LO", "Value": [c]}} for c in self.comments]
        return {tag_key(FAILED_ATTRIBUTES_SEQUENCE): {"vr": "SQ", "Value": items}}


@dataclass(frozen=True)
class UpdateRequest:
    study_uids: list[str]
    change: dict[str, Any]  # DICOM JSON of the change dataset, as the metadata stores it


def parse_update_request(document: Any) -> UpdateRequest:
    """Validates a parsed ``$bulkUpdate`` body (property names are case-insensitive)."""
    if not isinstance(document, dict):
        raise BodySyntaxInvalid()
    fields = {str(k).lower(): v for k, v in document.items()}
    uids, change = fields.get("studyinstanceuids"), fields.get("changedataset")
    if uids is None or uids == []:
        raise InvalidRequest("The required field 'StudyInstanceUids' is missing or empty.")
    if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
        raise BodySyntaxInvalid()
    if len(uids) > MAX_STUDIES:
        raise InvalidRequest(f"StudyInstanceUids count exceeded maximum length '{MAX_STUDIES}'")
    for uid in uids:
        if not is_valid_uid(uid):
            raise InvalidRequest(f"The StudyInstanceUid '{uid}' is invalid. {INVALID_UID_MESSAGE}")
    if change is None or change == {}:
        raise InvalidRequest("The required field 'ChangeDataset' is missing or empty.")
    if not isinstance(change, dict):
        raise BodySyntaxInvalid()
    study_uids = list(dict.fromkeys(normalize_uid(u) for u in uids))  # a study listed twice is updated once
    return UpdateRequest(study_uids, _checked_change(change))


def _checked_change(change: dict[str, Any]) -> dict[str, Any]:
    """The change dataset as stored DICOM JSON; every attribute must be updatable and valid, else 400 with all
    the problems."""
    comments: list[str] = []
    checked: dict[str, Any] = {}
    for key, value in change.items():
        if not _TAG_KEY.fullmatch(key):
            raise InvalidRequest(f"The field 'changeDataset' in request body is invalid: '{key}' is not a DICOM tag.")
        tag = int(key, 16)
        if tag not in UPDATABLE_TAGS:
            comments.append(error_comment(tag, NOT_UPDATABLE))
            continue
        problem, model = _checked_element(tag, value)
        if problem:
            comments.append(error_comment(tag, problem))
        else:
            checked.update(model)
    if comments:
        raise ChangeDatasetInvalid(comments)
    return dict(sorted(checked.items()))


def _checked_element(tag: int, value: Any) -> tuple[str | None, dict[str, Any]]:
    expected = dictionary_VR(tag)
    if not isinstance(value, dict) or value.get("vr") != expected:
        return f"The attribute must be given as DICOM JSON with VR '{expected}'.", {}
    problem = _json_type_error(expected, value)
    if problem:
        return problem, {}
    try:
        ds = Dataset.from_json({tag_key(tag): value})
        elem = ds[tag]
    except Exception as exc:  # pydicom raises several kinds for malformed DICOM JSON
        return f"The value is not valid DICOM JSON: {exc}", {}
    if elem.value is None or elem.value == "" or elem.VM == 0:
        return EMPTY_NOT_SUPPORTED, {}
    problem = element_error(elem, trim_nul=False)
    if problem:
        return problem, {}
    model, failed = dataset_to_json(ds)
    return (f"The value of the tag cannot be represented: {value!r}", {}) if failed else (None, model)


def _json_type_error(vr: str, element: dict[str, Any]) -> str | None:
    """Why a DICOM JSON element does not hold the JSON types its VR takes (PS3.18 F.2), or ``None``: pydicom would
    otherwise keep a number, an object or InlineBinary bytes as the value of a text attribute."""
    other = next((key for key in element if key not in ("vr", "Value")), None)
    if other is not None:
        return f"The value must be given as 'Value', not as '{other}'."
    values = element.get("Value")
    if values is None:
        return None  # no value: refused as an empty update
    if not isinstance(values, list):
        return "'Value' must be a JSON array."
    for item in values:
        if item is None:
            continue
        if vr == "PN":
            if not (isinstance(item, dict) and all(k in _PN_GROUPS and isinstance(v, str) for k, v in item.items())):
                return "A value of VR PN must be a JSON object of 'Alphabetic', 'Ideographic' and 'Phonetic' strings."
        elif vr in _NUMBER_VRS:
            if isinstance(item, bool) or not isinstance(item, int | float | str):
                return f"A value of VR {vr} must be a JSON number or string."
        elif not isinstance(item, str):
            return f"A value of VR {vr} must be a JSON string."
    return None


def start_update(operations: OperationService, partition: Partition, request: UpdateRequest) -> Operation:
    """A new ``update`` operation; 409 while another one is active (Azure runs one update at a time)."""
    parameters = {"partition_key": partition.key, "study_uids": request.study_uids, "change": request.change}
    return operations.start(OperationType.UPDATE, parameters, [], exclusive=True)


def _index_extended_tags(conn: Connection, versions: list[NewVersion]) -> None:
    """The new versions' values for the extended query tags (the old ones stop matching); a value a tag cannot
    index is left out, as at store time."""
    tags = indexing_tags(conn)
    if not tags:
        return
    for version in versions:
        values, _ = extract_values(tags, json.loads(version.metadata_json))
        if values:
            old = version.candidate
            write_instance_values(
                conn,
                old.partition_key,
                old.study_key,
                old.series_key,
                old.instance_key,
                version.reservation.watermark,
                values,
            )


def instance_error(partition_key: int, study_uid: str, candidate: UpdateCandidate) -> str:
    return (
        f"Instance UIDs - PartitionKey: {partition_key}, StudyInstanceUID: {study_uid}, "
        f"SeriesInstanceUID: {candidate.series_uid}, SOPInstanceUID: {candidate.sop_uid}"
    )


class BulkUpdateHandler:
    """The ``update`` operation: one task per study."""

    type = OperationType.UPDATE

    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.updates = UpdateIndex(index)
        self.blobs = blobs
        self.settings = settings

    def plan(self, operation: Operation) -> list[dict[str, Any]]:
        return [{"study": uid} for uid in operation.parameters["study_uids"]]

    def run_task(self, operation: Operation, payload: dict[str, Any], lease: TaskLease) -> dict[str, Any]:
        study_uid = payload["study"]
        partition_key = operation.parameters["partition_key"]
        change_model = operation.parameters["change"]
        change = Dataset.from_json(change_model)
        candidates = self.updates.study_instances(partition_key, study_uid)
        updated = sum(1 for c in candidates if c.updated_by == operation.id)
        pending = [c for c in candidates if c.updated_by != operation.id]
        errors: list[str] = []
        while pending:
            batch = pending[:BATCH_SIZE]
            done, committed, failed, held = self._update_batch(
                operation.id, partition_key, study_uid, batch, change, change_model, lease
            )
            pending = pending[done:]
            updated += committed
            errors.extend(instance_error(partition_key, study_uid, c) for c in failed)
            if not held:  # another worker has the task now; what is committed stays, it skips those
                break
        return {"study": study_uid, "instances": len(candidates), "updated": updated, "errors": errors}

    def finish(self, operation: Operation, results: list[dict[str, Any]]) -> tuple[OperationStatus, dict | None]:
        """Azure's counts: a study is processed once its task ran, failed when an instance could not be updated, and
        updated when it had instances and all were updated (an unknown study is processed but not updated)."""
        failed = [r for r in results if r["errors"]]
        summary: dict[str, Any] = {
            "studyProcessed": len(results),
            "studyUpdated": sum(1 for r in results if r["updated"] and not r["errors"]),
            "studyFailed": len(failed),
            "instanceUpdated": sum(r["updated"] for r in results),
        }
        if failed:
            errors = []
            for result in failed:
                errors.append(f"Failed to update instances for study {result['study']}")
                errors.extend(result["errors"])
            summary["errors"] = errors
            return OperationStatus.FAILED, summary
        return OperationStatus.SUCCEEDED, summary

    def _update_batch(
        self,
        operation_id: str,
        partition_key: int,
        study_uid: str,
        batch: list[UpdateCandidate],
        change: Dataset,
        change_model: dict[str, Any],
        lease: TaskLease,
    ) -> tuple[int, int, list[UpdateCandidate], bool]:
        """Writes new files durably, then commits them together; returns (instances done, committed, failed,
        whether the lease is still held).

        The lease is renewed between files. A batch of slow (large) files ends early, half-way through its
        reservations' hold, so it commits well before they fall due; the rest goes to the next batch.
        """
        hold = timedelta(seconds=self.settings.stale_create_seconds)
        reserved_at = time.monotonic()
        reservations = self.updates.reserve(
            len(batch),
            lambda i, watermark: blob_key(partition_key, study_uid, batch[i].series_uid, batch[i].sop_uid, watermark),
            hold,
        )
        documents = self.updates.documents([c.watermark for c in batch])
        versions: list[NewVersion] = []
        failed: list[UpdateCandidate] = []
        held, done = True, 0
        for candidate, reservation in zip(batch, reservations, strict=True):
            held = lease.keep()
            if not held or (done and time.monotonic() - reserved_at > hold.total_seconds() / 2):
                break
            done += 1
            try:
                document = json.loads(documents[candidate.watermark])
                versions.append(self._new_version(candidate, reservation, document, change, change_model))
            except Exception:  # this instance fails; its reservation makes the cleanup remove any partial file
                log.exception("instance update failed", extra={"sop_uid": candidate.sop_uid})
                failed.append(candidate)
        names_changed = (tag_key(PATIENT_NAME) in change_model, tag_key(REFERRING_PHYSICIAN_NAME) in change_model)
        committed = self.updates.commit(
            partition_key,
            study_uid,
            operation_id,
            versions,
            names_changed,
            timedelta(seconds=self.settings.delete_delay_seconds),
            hold / 4,
            _index_extended_tags,
        )
        return done, committed, failed, held

    def _new_version(
        self,
        candidate: UpdateCandidate,
        reservation: Reservation,
        document: dict[str, Any],
        change: Dataset,
        change_model: dict[str, Any],
    ) -> NewVersion:
        """Writes the new file durably (in memory first when small, else through a spool file) and builds its
        metadata from the stored JSON of the version it replaces."""
        staged = Staged() if candidate.file_size <= MEMORY_PART_LIMIT else Staged(path=self.blobs.new_staging_file())
        try:
            with self.blobs.open(candidate.blob_key) as src:
                if staged.data is not None:
                    out = io.BytesIO()
                    header, pixel_offset, size = rewrite(src, lambda ds: _apply(ds, change), out)
                    staged.data = bytearray(out.getbuffer())
                else:
                    with open(staged.path, "wb") as spool:
                        header, pixel_offset, size = rewrite(src, lambda ds: _apply(ds, change), spool)
            frames = None
            if candidate.frame_count:
                with staged.open() as f:
                    frames = index_frames(f, pixel_offset, size, header, UID(header.file_meta.TransferSyntaxUID))
            self.blobs.put(reservation.blob_key, staged)
        finally:
            self.blobs.discard(staged)
        document.update(change_model)
        charset = tag_key(SPECIFIC_CHARACTER_SET)
        if SPECIFIC_CHARACTER_SET in header and header.SpecificCharacterSet == UTF8:  # set by _apply, or as it was
            document[charset] = element_to_json(header[SPECIFIC_CHARACTER_SET])
        model = dict(sorted(document.items()))
        values, _ = indexed_values(model)
        return NewVersion(
            candidate=candidate,
            reservation=reservation,
            file_size=size,
            frames_json=json.dumps(frames, separators=(",", ":")) if frames else None,
            metadata_json=json.dumps(model, separators=(",", ":"), ensure_ascii=False),
            values=values,
        )


def rewrite(src: BinaryIO, edit: Callable[[Dataset], None], out: BinaryIO) -> tuple[Dataset, int, int]:
    """Writes the file of ``src`` with its header changed by ``edit`` to ``out``; returns (new header, offset of
    the pixel data element in ``out``, size of ``out``). Bulk update and de-identifying export use it.

    Only the elements before the pixel data are parsed and re-encoded (the updatable attributes all precede it);
    the pixel data and whatever follows are copied as they are, so pixel bytes stay identical and a large file is
    never held in memory. A deflated file has no byte offsets to copy from: it is read and written whole.
    """
    header = pydicom.dcmread(src, stop_before_pixels=True)
    tail: int | None = src.tell()
    if UID(header.file_meta.TransferSyntaxUID).is_deflated:
        src.seek(0)
        header, tail = pydicom.dcmread(src), None
    edit(header)
    meta = header.file_meta
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in header:
        meta.MediaStorageSOPClassUID = header.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in header:
        meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    pydicom.dcmwrite(out, header, enforce_file_format=True)
    pixel_offset = out.tell()
    if tail is not None:
        src.seek(tail)
        shutil.copyfileobj(src, out, 1 << 20)
    return header, pixel_offset, out.tell()


def _apply(ds: Dataset, change: Dataset) -> None:
    """Sets the changed attributes. Text the file's character set cannot hold turns a file in the default
    repertoire into UTF-8 (a superset of it); in any other character set it is an error, never a silent loss."""
    texts = [str(v) for elem in change for v in (elem.value if elem.VM > 1 else [elem.value])]
    if not all(t.isascii() for t in texts):
        declared = ds.get("SpecificCharacterSet") or []
        declared = [declared] if isinstance(declared, str) else [c for c in declared if c]
        if not declared or declared == ["ISO_IR 6"]:
            ds.SpecificCharacterSet = UTF8
        else:
            encodings = convert_encodings(declared)
            for text in texts:
                if not any(_encodes(text, e) for e in encodings):
                    raise ValueError(f"'{text}' cannot be written in the character set {declared}")
    for elem in change:
        ds[elem.tag] = elem


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


__all__ = [
    "BulkUpdateHandler",
    "ChangeDatasetInvalid",
    "UpdateRequest",
    "parse_update_request",
    "rewrite",
    "start_update",
]
