"""Extended query tags: validation of new tags, value extraction from the stored DICOM JSON, the tag operations of
the API, indexing at store time, and the re-index operation that indexes the instances stored before a tag existed.

Decisions (see docs/architecture.md): DS is not supported (Azure's code rejects it; its documentation lists it), IS is
indexed as an integer (the JSON model holds it as a number), FL values are compared at single precision, and too many
tags is a 400 (Azure answers 503).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from sqlalchemy import Connection

from dicomhub.config import Settings
from dicomhub.dicom.names import name_words
from dicomhub.dicom.validation import element_error
from dicomhub.domain.attributes import BY_TAG, IndexedAttribute, fold_value
from dicomhub.domain.errors import Conflict, InvalidRequest, ResourceNotFound
from dicomhub.domain.operations import (
    ActiveOperationConflict,
    Operation,
    OperationService,
    OperationStatus,
    OperationType,
    TaskLease,
)
from dicomhub.index.extended_tags import (
    ExtendedTag,
    ExtendedTagStore,
    ExtendedValue,
    NewTag,
    ReindexRow,
    TagError,
    TagsExist,
    TooManyTags,
    indexing_tags,
    record_errors,
    reindex_rows,
    write_instance_values,
)
from dicomhub.index.records import NewInstance
from dicomhub.index.schema import EXTENDED_ADDING, EXTENDED_DELETING, EXTENDED_READY

SUPPORTED_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "FD", "FL", "IS", "LO", "PN", "SH", "SL", "SS", "TM", "UI", "UL", "US"}
)
LEVELS = {"study": "study", "series": "series", "instance": "instance"}
STATUS_NAMES = {EXTENDED_ADDING: "adding", EXTENDED_READY: "ready", EXTENDED_DELETING: "deleting"}
REINDEX_CHUNK = 100  # instances per transaction inside a re-index task
_HEX = re.compile(r"[0-9A-Fa-f]{8}")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?", re.ASCII)
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", re.ASCII)
_INVALID_LO = re.compile(r"[\\\x00-\x1f]")


# -- tag paths and new tags -------------------------------------------------------------------------------------------
def parse_tag_path(text: str) -> str | None:
    """A tag path (8 hex digits or a keyword) as 8 upper-case hex digits; ``None`` when it is neither."""
    if _HEX.fullmatch(text):
        return text.upper()
    tag = tag_for_keyword(text)
    return f"{int(tag):08X}" if tag is not None else None


def _field(index: int, name: str, detail: str) -> InvalidRequest:
    return InvalidRequest(f"The field '[{index}].{name}' in request body is invalid: {detail}")


def _get(entry: dict[str, Any], name: str) -> Any:
    """Property names are case-insensitive."""
    for key, value in entry.items():
        if key.lower() == name.lower():
            return value
    return None


def parse_new_tags(body: Any) -> list[NewTag]:
    """Validates the body of an add request (a JSON array of entries); raises InvalidRequest with Azure's texts."""
    if not isinstance(body, list) or not body:
        raise InvalidRequest("The request body is invalid: it must be a non-empty array of extended query tags.")
    tags: list[NewTag] = []
    seen: set[str] = set()
    for i, entry in enumerate(body):
        if not isinstance(entry, dict):
            raise InvalidRequest(f"The field '[{i}]' in request body is invalid: an extended query tag is an object.")
        path, vr, creator, level = (_get(entry, k) for k in ("Path", "VR", "PrivateCreator", "Level"))
        for name, value in (("Path", path), ("Level", level)):
            if not isinstance(value, str) or not value.strip():
                detail = f"The Dicom Tag Property {name} must be specified and must not be null, empty or whitespace"
                raise _field(i, name, detail)
        if level.strip().lower() not in LEVELS:
            raise InvalidRequest(
                f"The field '$[{i}].Level' in request body is invalid: Expected value '{level}' to be one of the "
                "following values: ['Instance', 'Series', 'Study']"
            )
        tag = _validate_entry(path.strip(), vr, creator)
        if tag.path in seen:
            raise InvalidRequest(f"The extended query tag '{path}' has been specified before.")
        seen.add(tag.path)
        tags.append(NewTag(tag.path, tag.vr, tag.private_creator, LEVELS[level.strip().lower()]))
    return tags


def _unparseable(path: str) -> InvalidRequest:
    return InvalidRequest(f"The extended query tag '{path}' is invalid as it cannot be parsed into a valid Dicom Tag.")


def _validate_entry(path: str, vr: Any, creator: Any) -> NewTag:
    if "." in path:
        raise InvalidRequest("Sequential dicom tags are currently not supported.")
    normalized = parse_tag_path(path)
    if normalized is None:
        raise _unparseable(path)
    tag = int(normalized, 16)
    group, element = tag >> 16, tag & 0xFFFF
    if tag in BY_TAG:
        raise InvalidRequest(f"The query tag '{path}' is already supported.")
    if element == 0 or group in (0x0000, 0x0002) or (group % 2 and element < 0x0010):
        raise _unparseable(path)
    vr = vr.strip().upper() if isinstance(vr, str) and vr.strip() else None
    creator = creator if isinstance(creator, str) and creator != "" else None
    private = bool(group % 2)
    if not private:
        if creator is not None:
            raise InvalidRequest(f"The private creator for tag '{path}' must be empty.")
        try:
            known = dictionary_VR(tag)
        except KeyError:
            known = None
        if known is not None and vr is not None and vr not in known.split(" or "):
            raise InvalidRequest(
                f"The VR code '{vr}' is incorrectly specified for '{path}'. The expected VR code for it is '{known}'. "
                "Retry this request either with the correct VR code or without specifying it."
            )
        if vr is None and known is not None and " or " not in known:
            vr = known
    elif element <= 0x00FF:  # a private creator element itself
        if creator is not None:
            raise InvalidRequest(f"The private creator for private identification code '{path}' must be empty.")
        vr = vr or "LO"
    else:
        if creator is None:
            raise InvalidRequest(f"The private creator for private tag '{path}' is missing.")
        if len(creator) > 64 or _INVALID_LO.search(creator):
            raise InvalidRequest(
                f"The private creator '{creator}' of tag '{path}' exceeds maximum length or contains invalid character."
            )
    if vr is None:
        raise InvalidRequest(f"The vr for tag '{path}' is missing.")
    if vr not in SUPPORTED_VRS:
        raise InvalidRequest(f"The VR code '{vr}' for tag '{path}' is not supported.")
    return NewTag(normalized, vr, creator, "")


# -- values -----------------------------------------------------------------------------------------------------------
def normalize_datetime(value: str) -> str | None:
    """A DT value as ``YYYYMMDDHHMMSS.ffffff`` (missing parts at their minimum, UTC offset dropped); None if invalid."""
    match = _DT.fullmatch(value)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, _ = match.groups()
    text = f"{year}{month or '01'}{day or '01'}{hour or '00'}{minute or '00'}{second or '00'}"
    try:
        datetime.strptime(text, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return f"{text}.{(fraction or '.')[1:].ljust(6, '0')}"


def normalize_time(value: str) -> str | None:
    """A TM value as ``HHMMSS.ffffff``; None if invalid."""
    match = _TM.fullmatch(value)
    if not match:
        return None
    hour, minute, second, fraction = match.groups()
    if int(hour) > 23 or int(minute or 0) > 59 or int(second or 0) > 60:
        return None
    return f"{hour}{minute or '00'}{second or '00'}.{(fraction or '.')[1:].ljust(6, '0')}"


def single_precision(value: float) -> float:
    """FL values are 32-bit: stored and queried values are rounded alike, so ``1.1`` finds a stored 1.1f."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def attribute_of(tag: ExtendedTag) -> IndexedAttribute:
    return IndexedAttribute(tag.tag, tag.path, tag.vr, tag.level, None)


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "=".join(value.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
    return str(value)


def _creator_matches(tag: ExtendedTag, model: dict[str, Any]) -> bool:
    if tag.private_creator is None:
        return True
    group, block = tag.tag >> 16, (tag.tag >> 8) & 0xFF
    found = (model.get(f"{group:04X}{block:04X}") or {}).get("Value") or []
    return bool(found) and str(found[0]).rstrip(" \0") == tag.private_creator


def _value_of(tag: ExtendedTag, element: dict[str, Any]) -> ExtendedValue | str | None:
    """The indexed value of an element, an error message, or None when there is nothing to index."""
    if element.get("vr") != tag.vr:
        return f"The value of extended query tag '{tag.path}' has VR '{element.get('vr')}' instead of '{tag.vr}'."
    found = element.get("Value") or []
    first = found[0] if found else None
    if first is None or (isinstance(first, str | dict) and not _text(first).strip(" \0")):
        return None
    raw = _text(first).rstrip(" \0") if isinstance(first, str | dict) else first
    message = element_error(DataElement(tag.tag, tag.vr, raw), trim_nul=True)
    if message:
        return message
    if tag.kind == "long":
        try:
            return ExtendedValue(tag.key, tag.level, tag.vr, int(raw))
        except (TypeError, ValueError):
            return f"The value '{raw}' of extended query tag '{tag.path}' is not an integer."
    if tag.kind == "double":
        try:
            number = float(raw)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):  # NaN and infinities cannot be compared (SQLite stores NaN as NULL)
            return f"The value '{raw}' of extended query tag '{tag.path}' is not a finite number."
        return ExtendedValue(tag.key, tag.level, tag.vr, single_precision(number) if tag.vr == "FL" else number)
    text = str(raw).strip()
    if tag.vr == "DT" or tag.vr == "TM":
        normalized = normalize_datetime(text) if tag.vr == "DT" else normalize_time(text)
        if normalized is None:
            return f"The value '{text}' of extended query tag '{tag.path}' is not a valid {tag.vr} value."
        return ExtendedValue(tag.key, tag.level, tag.vr, normalized)
    folded = fold_value(attribute_of(tag), text)
    if not folded:
        return None
    words = tuple(name_words(text)) if tag.vr == "PN" else ()
    return ExtendedValue(tag.key, tag.level, tag.vr, folded, words)


def extract_values(tags: list[ExtendedTag], model: dict) -> tuple[list[ExtendedValue], list[tuple[int, str]]]:
    """The values of an instance (DICOM JSON model) for the tags, and (tag_key, message) for each tag whose value
    cannot be indexed. Absent or empty elements index nothing; only the first of several values is indexed."""
    values: list[ExtendedValue] = []
    errors: list[tuple[int, str]] = []
    for tag in tags:
        element = model.get(tag.path)
        if element is None or not _creator_matches(tag, model):
            continue
        outcome = _value_of(tag, element)
        if isinstance(outcome, str):
            errors.append((tag.key, outcome))
        elif outcome is not None:
            values.append(outcome)
    return values, errors


def _index_rows(conn: Connection, tags: list[ExtendedTag], rows: Sequence[ReindexRow]) -> int:
    """Writes the values of these instances and records their errors; returns the number of errors."""
    failed: dict[int, tuple[list[ReindexRow], list[str]]] = {}
    for row in rows:
        values, errors = extract_values(tags, json.loads(row.json))
        if values:
            write_instance_values(
                conn, row.partition_key, row.study_key, row.series_key, row.instance_key, row.watermark, values
            )
        for tag_key, message in errors:
            failed.setdefault(tag_key, ([], []))
            failed[tag_key][0].append(row)
            failed[tag_key][1].append(message)
    for tag_key, (failed_rows, messages) in failed.items():
        record_errors(conn, tag_key, failed_rows, messages)
    return sum(len(m) for _, m in failed.values())


def index_created(conn: Connection, created: Sequence[tuple[NewInstance, int, int, int]]) -> None:
    """Store time, inside the commit transaction: indexes the new instances for every tag being added or ready.
    (new instance, study key, series key, instance key) each."""
    tags = indexing_tags(conn)
    if not tags:
        return
    rows = [
        ReindexRow(key, n.partition_key, study_key, series_key, n.watermark, *_uids(n), n.metadata_json)
        for n, study_key, series_key, key in created
    ]
    _index_rows(conn, tags, rows)


def _uids(new: NewInstance) -> tuple[str, str, str]:
    return new.study_uid, new.series_uid, new.sop_uid


# -- the API's operations ---------------------------------------------------------------------------------------------
class ExtendedTagService:
    def __init__(self, store: ExtendedTagStore, operations: OperationService, settings: Settings) -> None:
        self.store = store
        self.operations = operations
        self.max_count = settings.max_extended_query_tags

    def add(self, body: Any) -> Operation:
        """Creates the tags (adding) and starts their re-index; ActiveOperationConflict when one is running."""
        tags = parse_new_tags(body)
        active = self.operations.active(OperationType.REINDEX)
        if active is not None:
            raise ActiveOperationConflict(active)
        try:
            self.store.add(tags, self.max_count)
        except TagsExist as exc:
            raise Conflict(f"The extended query tag(s) '{', '.join(exc.paths)}' already exist.") from None
        except TooManyTags:
            raise InvalidRequest(f"Extended query tags exceeds max allowed count '{self.max_count}'.") from None
        paths = [t.path for t in tags]
        try:
            operation = self.operations.start(
                OperationType.REINDEX, {"tags": paths}, [f"extendedquerytags/{p}" for p in paths], exclusive=True
            )
        except ActiveOperationConflict:
            self.store.delete(paths)  # another add started its re-index meanwhile: this one takes nothing
            raise
        self.store.attach_operation(paths, operation.id)
        return operation

    def list(self, limit: int, offset: int) -> list[ExtendedTag]:
        return self.store.list(limit, offset)

    def get(self, path_text: str) -> ExtendedTag:
        path = parse_tag_path(path_text)
        if path is None:
            raise InvalidRequest(f"The extended query tag path '{path_text}' is invalid.")
        tag = self.store.get(path)
        if tag is None:
            raise ResourceNotFound(f"The specified extended query tag with tag path {path_text} cannot be found.")
        return tag

    def set_query_status(self, path_text: str, body: Any) -> ExtendedTag:
        if not isinstance(body, dict):
            raise InvalidRequest("The request body is invalid: it must be an object with the field 'QueryStatus'.")
        unknown = [k for k in body if k.lower() != "querystatus"]
        if unknown:
            raise InvalidRequest(f'The field is not supported: "{unknown[0]}"')
        status = _get(body, "QueryStatus")
        if not isinstance(status, str) or status.lower() not in ("enabled", "disabled"):
            raise InvalidRequest(
                f"The field 'QueryStatus' in request body is invalid: Expected value '{status}' to be one of the "
                "following values: ['Disabled', 'Enabled']"
            )
        tag = self.get(path_text)
        self.store.set_query_enabled(tag.path, status.lower() == "enabled")
        return self.get(tag.path)

    def delete(self, path_text: str) -> None:
        tag = self.get(path_text)
        if tag.status == EXTENDED_ADDING and tag.operation_id is not None:
            operation = self.operations.store.get(tag.operation_id)
            if operation is not None and operation.status in ("notStarted", "running"):
                raise InvalidRequest(
                    f"The extended query tag '{tag.path}' is being added by operation '{tag.operation_id}'; "
                    "it can be deleted once the operation has ended."
                )
        self.store.delete([tag.path])

    def errors(self, path_text: str, limit: int, offset: int) -> list[TagError]:
        return self.store.errors(self.get(path_text).key, limit, offset)

    def lookup(self, tag: int) -> ExtendedTag | None:
        """QIDO: the extended tag of an attribute outside the core table (one indexed query)."""
        return self.store.get(f"{tag:08X}")


class ReindexHandler:
    """The ``reindex`` operation: watermark ranges, each indexed from the stored JSON (no DICOM file is opened)."""

    type = OperationType.REINDEX

    def __init__(self, store: ExtendedTagStore, settings: Settings) -> None:
        self.store = store
        self.batch = max(1, settings.reindex_batch_size)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def plan(self, operation: Operation) -> list[dict[str, Any]]:
        bounds = self.store.watermark_bounds()
        if bounds is None:
            return []
        low, high = bounds
        return [{"low": start, "high": min(start + self.batch - 1, high)} for start in range(low, high + 1, self.batch)]

    def run_task(self, operation: Operation, payload: dict[str, Any], lease: TaskLease) -> dict[str, Any]:
        tags = [t for t in self.store.by_paths(operation.parameters["tags"]) if t.status == EXTENDED_ADDING]
        indexed = failed = 0
        if tags:
            for start in range(payload["low"], payload["high"] + 1, REINDEX_CHUNK):
                if not lease.keep():
                    return {"abandoned": True, "worker": self.worker}
                with self.store.write() as conn:
                    rows = reindex_rows(conn, start, min(start + REINDEX_CHUNK - 1, payload["high"]))
                    failed += _index_rows(conn, tags, rows)
                indexed += len(rows)
        return {"instances": indexed, "errors": failed, "worker": self.worker}

    def finish(self, operation: Operation, results: list[dict[str, Any]]) -> tuple[OperationStatus, dict | None]:
        self.store.finish_adding(operation.parameters["tags"])
        return OperationStatus.SUCCEEDED, None
