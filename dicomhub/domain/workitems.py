"""Worklist (UPS-RS, PS3.18 chapter 11 / PS3.4 Annex CC) with Azure's rules and codes (spec 5.8): create, retrieve,
update, change state, request cancellation and search of workitems, and the watch side (subscriptions and their
events) that Azure does not have.

Datasets are DICOM JSON models (keys: 8 upper-case hex digits). A workitem's search attributes are folded the way
QIDO folds them and matched with QIDO's rules (``domain/query.py``); :func:`parse_workitem_query` and
:meth:`WorkitemService.search` are the search a Modality Worklist C-FIND can use too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicomhub.dicom.json_model import dataset_to_json
from dicomhub.dicom.names import name_words
from dicomhub.dicom.tags import format_tag, keyword_of, parse_attribute_id
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid, normalize_uid
from dicomhub.dicom.validation import dataset_errors, pydicom_error
from dicomhub.domain.attributes import IndexedAttribute, fold_value
from dicomhub.domain.errors import BodySyntaxInvalid, Conflict, InvalidRequest, ResourceNotFound
from dicomhub.domain.extended_tags import normalize_datetime
from dicomhub.domain.query import (
    CONTROL_PARAMS,
    DEFAULT_LIMIT,
    attribute_filter,
    empty_value,
    invalid_parameter,
    parse_control,
)
from dicomhub.index.records import Partition
from dicomhub.index.workitems import Event, WorkitemExists, WorkitemFilter, WorkitemRow, WorkitemStore, WorkitemValues

UPS_PUSH_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"  # PS3.4 CC.3.1: the well-known UPS global subscription instance
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"
GLOBAL_UIDS = (GLOBAL_SUBSCRIPTION, FILTERED_GLOBAL_SUBSCRIPTION)

SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED = "SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"
TARGET_STATES = (IN_PROGRESS, COMPLETED, CANCELED)
FINAL_STATES = (COMPLETED, CANCELED)
STATE_REPORT, CANCEL_REQUESTED = 1, 2  # EventTypeID (0000,1002), PS3.4 Table CC.2.4-1
MAX_AE_TITLE = 16
NOT_FOUND = "The workitem instance is not found."
ALREADY_CANCELED = "The UPS is already in the requested state of CANCELED."  # spec 5.8 [TEST]


def _key(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


SOP_CLASS, SOP_INSTANCE = _key("SOPClassUID"), _key("SOPInstanceUID")
TRANSACTION = _key("TransactionUID")
STATE = _key("ProcedureStepState")
READINESS = _key("InputReadinessState")
MODIFIED = _key("ScheduledProcedureStepModificationDateTime")
WORKLIST_LABEL = _key("WorklistLabel")
PROGRESS = _key("ProcedureStepProgressInformationSequence")
PERFORMED = _key("UnifiedProcedureStepPerformedProcedureSequence")
REQUESTS = _key("ReferencedRequestSequence")
CANCELLATION_TIME = _key("ProcedureStepCancellationDateTime")
REASON = _key("ReasonForCancellation")
DISCONTINUATION = _key("ProcedureStepDiscontinuationReasonCodeSequence")
CONTACT_URI, CONTACT_NAME = _key("ContactURI"), _key("ContactDisplayName")
COMMUNICATIONS = _key("ProcedureStepCommunicationsURISequence")
CODE_MEANING = _key("CodeMeaning")


def _keys(*keywords: str) -> tuple[str, ...]:
    return tuple(_key(k) for k in keywords)


# PS3.4 Table CC.2.5-3, N-CREATE column, as Azure applies it (1C/2C conditions treated as optional; spec 5.8)
CREATE_TYPE_1 = _keys(
    "ScheduledProcedureStepPriority", "ProcedureStepLabel", "ScheduledProcedureStepStartDateTime", "InputReadinessState"
)
CREATE_TYPE_2 = _keys(
    "TransactionUID",
    "ScheduledProcessingParametersSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledWorkitemCodeSequence",
    "CommentsOnTheScheduledProcedureStep",
    "InputInformationSequence",
    "PatientName",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "ReferencedRequestSequence",
    "ProcedureStepProgressInformationSequence",
    "UnifiedProcedureStepPerformedProcedureSequence",
)
REQUEST_TYPE_1 = _keys("StudyInstanceUID")
REQUEST_TYPE_2 = _keys(
    "AccessionNumber",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "RequestedProcedureCodeSequence",
    "IssuerOfAccessionNumberSequence",
    "OrderPlacerIdentifierSequence",
    "OrderFillerIdentifierSequence",
)
# code sequences whose items (Code Sequence Macro) need a CodeMeaning
CODE_SEQUENCES = _keys(
    "ScheduledWorkitemCodeSequence",
    "ScheduledStationNameCodeSequence",
    "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence",
    "AdmittingDiagnosesCodeSequence",
    "RequestedProcedureCodeSequence",
)
# PS3.4 Table CC.2.5-3: the Patient Demographic, Patient Medical and Admission attributes of a workitem
PATIENT_AND_ADMISSION = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
)
# PS3.4 Table CC.2.5-3, N-SET column: attributes an update may not carry
NOT_ALLOWED_ON_UPDATE = _keys(
    "SOPClassUID", "SOPInstanceUID", "ProcedureStepState", "TransactionUID", *PATIENT_AND_ADMISSION
)
# Final State column: what a workitem must hold to become COMPLETED / CANCELED
COMPLETED_PERFORMED = _keys(
    "PerformedStationNameCodeSequence",
    "PerformedProcedureStepStartDateTime",
    "PerformedWorkitemCodeSequence",
    "PerformedProcedureStepEndDateTime",
    "OutputInformationSequence",
)
CANCELED_PROGRESS = _keys("ProcedureStepCancellationDateTime", "ProcedureStepDiscontinuationReasonCodeSequence")
CANCEL_REQUEST_ATTRIBUTES = _keys(
    "ReasonForCancellation",
    "ContactURI",
    "ContactDisplayName",
    "ProcedureStepDiscontinuationReasonCodeSequence",
    "UnifiedProcedureStepPerformedProcedureSequence",
)
# Return keys of a search (CC.2.5-3 Return Key types 1 and 2, top level), beyond the matching and included ones
RETURN_KEYS = frozenset(
    _keys(
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "ScheduledProcedureStepPriority",
        "ScheduledProcedureStepModificationDateTime",
        "ProcedureStepLabel",
        "WorklistLabel",
        "ScheduledProcessingParametersSequence",
        "ScheduledStationNameCodeSequence",
        "ScheduledStationClassCodeSequence",
        "ScheduledStationGeographicLocationCodeSequence",
        "ScheduledHumanPerformersSequence",
        "ScheduledProcedureStepStartDateTime",
        "ExpectedCompletionDateTime",
        "ScheduledWorkitemCodeSequence",
        "CommentsOnTheScheduledProcedureStep",
        "InputReadinessState",
        "InputInformationSequence",
        "StudyInstanceUID",
        *PATIENT_AND_ADMISSION,
        "ReferencedRequestSequence",
        "ProcedureStepState",
        "ProcedureStepProgressInformationSequence",
        "UnifiedProcedureStepPerformedProcedureSequence",
    )
)


@dataclass(frozen=True)
class SearchKey:
    """A searchable workitem attribute (Azure's list, spec 5.8): how it is matched and where it is stored."""

    attribute: IndexedAttribute
    stored_as: str  # a column or value attribute of index/workitems.py


def _search_key(path: str, vr: str, stored_as: str) -> tuple[tuple[int, ...], SearchKey]:
    tags = tuple(int(tag_for_keyword(k)) for k in path.split("."))
    return tags, SearchKey(IndexedAttribute(tags[-1], path, vr, "workitem", None), stored_as)


SEARCH_KEYS = dict(
    (
        _search_key("PatientName", "PN", "patient_name"),
        _search_key("PatientID", "LO", "patient_id"),
        _search_key("ReferencedRequestSequence.AccessionNumber", "SH", "accession_number"),
        _search_key("ReferencedRequestSequence.RequestedProcedureID", "SH", "requested_procedure_id"),
        _search_key("ScheduledProcedureStepStartDateTime", "DT", "scheduled_start"),
        _search_key("ScheduledStationNameCodeSequence.CodeValue", "SH", "station_name"),
        _search_key("ScheduledStationClassCodeSequence.CodeValue", "SH", "station_class"),
        _search_key("ScheduledStationGeographicLocationCodeSequence.CodeValue", "SH", "station_location"),
        _search_key("ProcedureStepState", "CS", "state"),
        _search_key("StudyInstanceUID", "UI", "study_uid"),
    )
)
# Values checked against their VR, as Azure does: the required, state and searched attributes (others are kept as
# sent: Azure's own conformance collection creates a workitem with a CS value of 17 characters)
VALIDATED = frozenset({SOP_INSTANCE, TRANSACTION, STATE, *CREATE_TYPE_1, *(f"{tags[0]:08X}" for tags in SEARCH_KEYS)})
_AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}")  # PS3.5 AE: printable ASCII without backslash


class WorkitemConflict(Conflict):
    """409; ``warning`` tells the API to repeat the message in a ``Warning: 299`` header (spec 5.8)."""

    def __init__(self, message: str, warning: bool = False) -> None:
        super().__init__(message)
        self.warning = warning


@dataclass
class WorkitemQuery:
    filters: list[WorkitemFilter] = field(default_factory=list)
    filter_keys: set[str] = field(default_factory=set)  # top-level keys of the matching attributes (returned)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0


# -- datasets ---------------------------------------------------------------------------------------------------------
def dataset_from_body(body: Any) -> dict[str, Any]:
    """The first dataset of a request body (a JSON array of DICOM JSON datasets, spec 5.8), in canonical form, its
    values validated by VR."""
    if not isinstance(body, list) or not body:
        raise InvalidRequest("The request body must be a JSON array holding one DICOM JSON dataset.")
    first = body[0]
    if not isinstance(first, dict):
        raise BodySyntaxInvalid()
    try:
        ds = Dataset.from_json(first)
        errors = dataset_errors(ds, trim_nul=True)
        model, unconvertible = dataset_to_json(ds)
    except Exception as exc:  # pydicom raises many kinds on a malformed model
        raise InvalidRequest(f"The DICOM JSON dataset is invalid: {pydicom_error(exc)}") from None
    for tag in [*unconvertible, *errors]:
        if f"{tag:08X}" in VALIDATED:
            detail = errors.get(tag, "the value cannot be converted")
            raise InvalidRequest(f"The attribute {_name(f'{tag:08X}')} is invalid: {detail}")
    return model


def _name(key: str) -> str:
    tag = int(key, 16)
    return f"{keyword_of(tag)} {format_tag(tag)}"


def values(model: dict[str, Any], key: str) -> list[Any]:
    element = model.get(key)
    return (element.get("Value") or []) if isinstance(element, dict) else []


def _text(value: Any) -> str:
    if isinstance(value, dict):  # person name
        return "=".join(value.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
    return "" if value is None else str(value)


def first_text(model: dict[str, Any], key: str) -> str:
    found = values(model, key)
    return _text(found[0]).strip() if found else ""


def _missing(key: str, context: str = "") -> InvalidRequest:
    return InvalidRequest(f"The attribute {_name(key)}{context} is required but missing.")


def _empty_value(key: str, context: str = "") -> InvalidRequest:
    return InvalidRequest(f"The attribute {_name(key)}{context} is required to have a value but it is empty.")


def _require(model: dict[str, Any], type_1: Sequence[str], type_2: Sequence[str], context: str = "") -> None:
    for key in type_1:
        if key not in model:
            raise _missing(key, context)
        if not values(model, key):
            raise _empty_value(key, context)
    for key in type_2:
        if key not in model:
            raise _missing(key, context)


def _check_code_items(model: dict[str, Any], context: str = "") -> None:
    for key in CODE_SEQUENCES:
        for item in values(model, key):
            if not values(item, CODE_MEANING):
                raise InvalidRequest(
                    f"The attribute {_name(CODE_MEANING)} in {_name(key)}{context} is required to have a value but "
                    "it is missing or empty."
                )


def check_create(model: dict[str, Any]) -> None:
    """PS3.4 Table CC.2.5-3 for N-CREATE (spec 5.8); raises InvalidRequest naming the attribute."""
    _require(model, CREATE_TYPE_1, CREATE_TYPE_2)
    if values(model, TRANSACTION):
        raise InvalidRequest(f"The attribute {_name(TRANSACTION)} must be empty when a workitem is created.")
    state = first_text(model, STATE)
    if state and state != SCHEDULED:
        raise InvalidRequest(f"The attribute {_name(STATE)} must be '{SCHEDULED}' when a workitem is created.")
    for key in (PROGRESS, PERFORMED):
        if any(values(model, key)):
            raise InvalidRequest(f"The items of {_name(key)} are not allowed when a workitem is created.")
    _check_code_items(model)
    for item in values(model, REQUESTS):
        context = f" in {_name(REQUESTS)}"
        _require(item, REQUEST_TYPE_1, REQUEST_TYPE_2, context)
        _check_code_items(item, context)


def check_update(model: dict[str, Any]) -> None:
    """PS3.4 Table CC.2.5-3 for N-SET: no attribute marked Not Allowed; Type 1 ones keep a value."""
    for key in NOT_ALLOWED_ON_UPDATE:
        if key in model:
            raise InvalidRequest(f"The attribute {_name(key)} is not allowed in an update of a workitem.")
    for key in CREATE_TYPE_1:
        if key in model and not values(model, key):
            raise _empty_value(key)
    _check_code_items(model)


def _check_final_state(model: dict[str, Any], target: str) -> None:
    """The Final State column of CC.2.5-3: what a COMPLETED or CANCELED workitem must hold."""
    sequence, required = (PERFORMED, COMPLETED_PERFORMED) if target == COMPLETED else (PROGRESS, CANCELED_PROGRESS)
    items = values(model, sequence)
    if not items:
        raise InvalidRequest(
            f"The workitem instance can not become {target}: the attribute {_name(sequence)} is required to have "
            "an item but it is missing or empty."
        )
    for key in required:
        if key not in items[0]:
            raise InvalidRequest(
                f"The workitem instance can not become {target}: the attribute {_name(key)} in {_name(sequence)} "
                "is required but missing."
            )


def _now_dt() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S.%f")


def _element(vr: str, *found: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(found)} if found else {"vr": vr}


def _sorted(model: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(model.items()))


def index_values(model: dict[str, Any], state: str) -> WorkitemValues:
    """The folded search values of a workitem, as its search keys match them."""
    result = WorkitemValues()
    for tags, key in SEARCH_KEYS.items():
        if len(tags) == 1:
            found = first_text(model, f"{tags[0]:08X}")
            result.columns[key.stored_as] = _folded(key, found) if found else None
        else:
            for item in values(model, f"{tags[0]:08X}"):
                for value in values(item, f"{tags[1]:08X}"):
                    if _text(value).strip():
                        result.values.append((key.stored_as, _folded(key, _text(value))))
    result.columns["state"] = state
    result.values.extend(("patient_name_word", w) for w in name_words(first_text(model, _key("PatientName"))))
    return result


def _folded(key: SearchKey, value: str) -> str:
    if key.attribute.vr == "DT":
        return normalize_datetime(value) or value
    if key.attribute.vr == "UI":
        return normalize_uid(value)
    return fold_value(key.attribute, value)


def without_transaction(model: dict[str, Any]) -> dict[str, Any]:
    """What clients see of a workitem: never the owner's Transaction UID (spec 5.8)."""
    return {k: v for k, v in model.items() if k != TRANSACTION}


# -- search -----------------------------------------------------------------------------------------------------------
def parse_workitem_query(params: Sequence[tuple[str, str]], controls: bool = True) -> WorkitemQuery:
    """Search parameters (QIDO's matching, Azure's keys, paging 1..200) as index filters; raises InvalidRequest.
    ``controls=False`` parses a filtered subscription's keys, where paging and includefield have no place."""
    query = WorkitemQuery()
    fuzzy = False
    seen: set[str] = set()
    matches: list[tuple[SearchKey, str, str]] = []
    for name, value in params:
        lower = name.lower()
        if controls and lower in CONTROL_PARAMS:
            control, parsed = parse_control(name, value, seen)
            if control == "includefield":
                _parse_includefield(query, value)
            elif control == "fuzzymatching":
                fuzzy = bool(parsed)
            else:
                setattr(query, control, parsed)
            continue
        if name in seen:
            raise InvalidRequest(f"Duplicate AttributeId '{name}'. Each attribute is only supported once.")
        seen.add(name)
        tags = tuple(parse_attribute_id(part) for part in name.split("."))
        key = SEARCH_KEYS.get(tags) if None not in tags else None  # type: ignore[arg-type]
        if key is None:
            raise InvalidRequest(f"Invalid workitem query. AttributeId '{name}' is not queryable.")
        if not value.strip():
            raise empty_value(name)
        matches.append((key, name, value))
        query.filter_keys.add(f"{tags[0]:08X}")
    for key, name, value in matches:
        condition = attribute_filter(key.attribute, name, value, fuzzy)
        if condition.match == "exact" and key.attribute.vr in ("CS", "SH", "LO") and condition.values[0] == "":
            raise empty_value(name)
        query.filters.append(WorkitemFilter(key.stored_as, condition))
    return query


def _parse_includefield(query: WorkitemQuery, value: str) -> None:
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if item.lower() == "all":
            query.include_all = True
            continue
        tag = parse_attribute_id(item)
        if tag is None:
            raise invalid_parameter("includefield", f"The attribute '{item}' in includefield is unknown.")
        query.include.add(f"{tag:08X}")


def _returned(model: dict[str, Any], query: WorkitemQuery) -> dict[str, Any]:
    if query.include_all:
        return _sorted(without_transaction(model))
    wanted = RETURN_KEYS | query.filter_keys | query.include
    return _sorted({k: v for k, v in model.items() if k in wanted and k != TRANSACTION})


# -- events -----------------------------------------------------------------------------------------------------------
def state_report(uid: str, document: str) -> str:
    """A UPS State Report (PS3.4 CC.2.4.2) of a workitem's current dataset, as the DICOM JSON text sent."""
    model = json.loads(document)
    report = {
        "00001000": _element("UI", uid),
        "00001002": _element("US", STATE_REPORT),
        STATE: _element("CS", *values(model, STATE)),
        READINESS: _element("CS", *values(model, READINESS)),
    }
    if first_text(model, STATE) == CANCELED:
        progress = (values(model, PROGRESS) or [{}])[0]
        report.update({k: progress[k] for k in (REASON, DISCONTINUATION) if k in progress})
    return json.dumps(_sorted(report))


def cancel_requested(uid: str, request: dict[str, Any]) -> str:
    """A UPS Cancel Requested event (PS3.4 CC.2.4.2): the requestor's reason and contact."""
    event = {"00001000": _element("UI", uid), "00001002": _element("US", CANCEL_REQUESTED)}
    event.update({k: request[k] for k in (REASON, DISCONTINUATION, CONTACT_URI, CONTACT_NAME) if k in request})
    return json.dumps(_sorted(event))


def check_ae_title(aet: str) -> str:
    if not _AE_TITLE.fullmatch(aet) or not aet.strip():
        raise InvalidRequest(
            f"The AE title '{aet[:64]}' is invalid: it must be 1 to {MAX_AE_TITLE} printable ASCII characters "
            "(no backslash)."
        )
    return aet.strip()


def check_workitem_uid(uid: str, name: str = "workitem UID") -> str:
    if not is_valid_uid(uid):
        raise InvalidRequest(f"The {name} '{uid[:128]}' is invalid. {INVALID_UID_MESSAGE}")
    return normalize_uid(uid)


# -- the service ------------------------------------------------------------------------------------------------------
_TRANSITION_ATTEMPTS = 5  # re-reads of a workitem another request changed meanwhile


def _transition_error(target: str, code: str) -> InvalidRequest:
    return InvalidRequest(f"The workitem instance can not transition to '{target}' state: {code}.")


def _transition(row: WorkitemRow, target: str, transaction_uid: str) -> str | None:
    """PS3.4 CC.2.1.3 / spec 5.8's table: None to change the state, ``warning:<text>`` for B304/B306, else raises."""
    current = row.state
    matches = transaction_uid == row.transaction_uid or (row.transaction_uid is None and target == IN_PROGRESS)
    if current == SCHEDULED:
        if target == IN_PROGRESS:
            return None
        raise _transition_error(target, "C310")  # not yet IN PROGRESS: nothing to complete or cancel
    if not matches:
        raise _transition_error(target, "C301")
    if current == IN_PROGRESS:
        if target == IN_PROGRESS:
            raise _transition_error(target, "C302")
        return None
    if current == target:
        code = "B306" if target == COMPLETED else "B304"
        return f"warning:The workitem instance is already in the final state '{target}'. {code}."
    raise _transition_error(target, "C300")


class WorkitemService:
    def __init__(self, store: WorkitemStore) -> None:
        self.store = store

    # -- push ---------------------------------------------------------------------------------------------------------
    def create(self, partition: Partition, query_uid: str | None, model: dict[str, Any]) -> str:
        """Creates a SCHEDULED workitem; its UID (query or dataset, which must agree). Raises InvalidRequest,
        Conflict (exists)."""
        body_uid = first_text(model, SOP_INSTANCE) or None
        if query_uid is not None and body_uid is not None and normalize_uid(body_uid) != normalize_uid(query_uid):
            raise InvalidRequest("SOPInstanceUID in the payload does not match the workitem query parameter.")
        uid = query_uid or body_uid
        if uid is None:
            raise InvalidRequest(
                "The workitem instance UID is missing: give it as the query (?{uid}) or as SOPInstanceUID."
            )
        uid = check_workitem_uid(uid)
        if uid in GLOBAL_UIDS:
            raise InvalidRequest(f"The workitem UID '{uid}' is reserved for global subscriptions.")
        check_create(model)
        model = {
            **model,
            SOP_CLASS: _element("UI", UPS_PUSH_SOP_CLASS),
            SOP_INSTANCE: _element("UI", uid),
            MODIFIED: _element("DT", _now_dt()),
            WORKLIST_LABEL: _element("LO", "worklist"),  # Azure overwrites it (spec 5.8)
            STATE: _element("CS", SCHEDULED),
            TRANSACTION: _element("UI"),
        }
        try:
            self.store.create(
                partition.key, uid, SCHEDULED, json.dumps(_sorted(model)), index_values(model, SCHEDULED), state_report
            )
        except WorkitemExists:
            raise Conflict(f"The workitem instance '{uid}' already exists.") from None
        return uid

    def retrieve(self, partition: Partition, uid: str) -> dict[str, Any]:
        row = self._row(partition, uid, ResourceNotFound)
        return without_transaction(json.loads(row.json))

    def update(self, partition: Partition, uid: str, transaction_uid: str | None, changes: dict[str, Any]) -> None:
        """Merges ``changes`` (top-level attributes replaced whole) into the workitem; the owner's transaction UID
        once it is IN PROGRESS (spec 5.8). A concurrent change of the workitem is a 409, nothing written."""
        row = self._row(partition, uid, InvalidRequest)  # Azure's code answers 400 here (spec 5.8, Appendix A.8)
        if row.state == SCHEDULED and transaction_uid is not None:
            raise InvalidRequest("The Transaction UID must not be given while the workitem is SCHEDULED. C301.")
        if row.state == IN_PROGRESS and transaction_uid is None:
            raise InvalidRequest("The Transaction UID is missing: the workitem is IN PROGRESS. C302.")
        if row.state == IN_PROGRESS and transaction_uid != row.transaction_uid:
            raise InvalidRequest("The Transaction UID does not match the one of the workitem's owner. C301.")
        if row.state == COMPLETED:
            raise InvalidRequest("The workitem instance is COMPLETED and can no longer be updated. C306.")
        if row.state == CANCELED:
            raise Conflict("The workitem instance is CANCELED and can no longer be updated. C304.")
        check_update(changes)
        model = {**json.loads(row.json), **changes, MODIFIED: _element("DT", _now_dt())}
        saved = self.store.save(
            partition.key,
            row,
            row.state,
            row.transaction_uid,
            json.dumps(_sorted(model)),
            index_values(model, row.state),
            None,
        )
        if not saved:
            raise Conflict("The workitem instance was changed by another request meanwhile; read it and retry.")

    def change_state(self, partition: Partition, uid: str, request: dict[str, Any]) -> str | None:
        """Claims, completes or cancels a workitem (PS3.4 CC.2.1.3); a warning text for B304/B306 (state already
        reached). Each state change queues a State Report for the workitem's subscribers."""
        _require(request, (TRANSACTION, STATE), ())
        target = first_text(request, STATE)
        if target not in TARGET_STATES:
            allowed = ", ".join(f"'{s}'" for s in TARGET_STATES)
            raise InvalidRequest(
                f"Expected value '{target}' of {_name(STATE)} to be one of the following values: {allowed}."
            )
        transaction_uid = check_workitem_uid(first_text(request, TRANSACTION), "Transaction UID")
        for _ in range(_TRANSITION_ATTEMPTS):
            row = self._row(partition, uid, ResourceNotFound)  # C307: no such workitem
            outcome = _transition(row, target, transaction_uid)
            if outcome is not None:
                return outcome.removeprefix("warning:")
            model = {**json.loads(row.json), STATE: _element("CS", target), MODIFIED: _element("DT", _now_dt())}
            if target in FINAL_STATES:
                _check_final_state(model, target)
            document = json.dumps(_sorted(model))
            owner = transaction_uid
            if self.store.save(
                partition.key, row, target, owner, document, index_values(model, target), state_report(uid, document)
            ):
                return None
        raise Conflict("The workitem instance is being changed by other requests; retry.")

    def request_cancel(self, partition: Partition, uid: str, request: dict[str, Any]) -> str:
        """Cancels a SCHEDULED workitem at once, or asks the subscribers of an IN PROGRESS one to (Cancel Requested
        event); the message of the 202 answer."""
        for key in request:
            if key not in CANCEL_REQUEST_ATTRIBUTES:
                raise InvalidRequest(f"The attribute {_name(key)} is not allowed in a cancellation request.")
        for _ in range(_TRANSITION_ATTEMPTS):
            row = self._row(partition, uid, ResourceNotFound)
            if row.state == CANCELED:
                raise WorkitemConflict(ALREADY_CANCELED, warning=True)
            if row.state == COMPLETED:
                raise InvalidRequest("The workitem instance is already COMPLETED and can not be canceled. C311.")
            if row.state == IN_PROGRESS:
                if not self.store.subscriptions_of(partition.key, uid):
                    raise InvalidRequest(
                        "The workitem instance is IN PROGRESS and no subscriber can be asked to cancel it. C312."
                    )
                self.store.notify(partition.key, uid, cancel_requested(uid, request))
                return "The cancellation of the workitem instance has been requested from its subscribers."
            model = json.loads(row.json)
            progress = {
                **((values(model, PROGRESS) or [{}])[0]),
                CANCELLATION_TIME: _element("DT", _now_dt()),
                **{k: request[k] for k in (REASON, DISCONTINUATION) if k in request},
            }
            contact = {k: request[k] for k in (CONTACT_URI, CONTACT_NAME) if k in request}
            if contact:
                progress[COMMUNICATIONS] = {"vr": "SQ", "Value": [_sorted(contact)]}
            progress.setdefault(DISCONTINUATION, {"vr": "SQ"})
            model.update(
                {
                    PROGRESS: {"vr": "SQ", "Value": [_sorted(progress)]},
                    STATE: _element("CS", CANCELED),
                    MODIFIED: _element("DT", _now_dt()),
                }
            )
            document = json.dumps(_sorted(model))
            if self.store.save(
                partition.key, row, CANCELED, None, document, index_values(model, CANCELED), state_report(uid, document)
            ):
                return "The workitem instance has been cancelled."
        raise Conflict("The workitem instance is being changed by other requests; retry.")

    def _row(self, partition: Partition, uid: str, missing: type[InvalidRequest] | type[ResourceNotFound]):
        row = self.store.get(partition.key, check_workitem_uid(uid))
        if row is None:
            raise missing(NOT_FOUND)
        return row

    # -- pull ---------------------------------------------------------------------------------------------------------
    def search(self, partition: Partition, query: WorkitemQuery) -> list[dict[str, Any]]:
        """One page of matching workitems, each with the return keys, the matched and the included attributes."""
        rows = self.store.search(partition.key, query.filters, query.limit, query.offset)
        return [_returned(json.loads(document), query) for _, document in rows]

    # -- watch --------------------------------------------------------------------------------------------------------
    def subscribe(
        self, partition: Partition, uid: str, aet: str, deletion_lock: bool, filters: Sequence[tuple[str, str]]
    ) -> None:
        """Subscribes to one workitem, or globally (the well-known UIDs; the filtered one with ``filters``)."""
        aet = check_ae_title(aet)
        uid = check_workitem_uid(uid)
        if uid == FILTERED_GLOBAL_SUBSCRIPTION and not filters:
            raise InvalidRequest("A filtered global subscription needs a filter (filter=Key=value).")
        if filters and uid != FILTERED_GLOBAL_SUBSCRIPTION:
            raise InvalidRequest(f"A filter is only allowed with the filtered global subscription {uid}.")
        if uid in GLOBAL_UIDS:
            conditions = parse_workitem_query(filters, controls=False).filters
            self.store.subscribe_global(partition.key, aet, uid, deletion_lock, conditions, state_report)
        elif not self.store.subscribe(partition.key, aet, uid, deletion_lock, state_report):
            raise ResourceNotFound(NOT_FOUND)

    def unsubscribe(self, partition: Partition, uid: str, aet: str) -> None:
        """Ends one subscription; a global unsubscription ends every subscription of the AE title (PS3.4 CC.2.3.2)."""
        aet = check_ae_title(aet)
        uid = check_workitem_uid(uid)
        if uid in GLOBAL_UIDS:
            self.store.unsubscribe_all(partition.key, aet)
            return
        self._row(partition, uid, ResourceNotFound)
        self.store.unsubscribe(partition.key, aet, uid)

    def suspend(self, partition: Partition, uid: str, aet: str) -> None:
        """Stops new automatic subscriptions of a global subscription; existing ones stay."""
        aet = check_ae_title(aet)
        uid = check_workitem_uid(uid)
        if uid not in GLOBAL_UIDS:
            raise InvalidRequest("Only a global subscription can be suspended.")
        if not self.store.suspend(partition.key, aet, uid):
            raise ResourceNotFound(f"The AE title '{aet}' has no global subscription to suspend.")

    def pending_events(self, partition: Partition, aet: str, limit: int) -> list[Event]:
        """The oldest events queued for ``aet`` (the watch channel's next batch), in the order they were written."""
        return self.store.pending_events(partition.key, aet, limit)

    def delivered(self, keys: Sequence[int]) -> None:
        """Events a subscriber has been sent; they leave its queue."""
        self.store.delivered(keys)


def parse_filters(raw: Sequence[str]) -> list[tuple[str, str]]:
    """``filter=Key=value`` query values of a filtered global subscription (repeatable) as search parameters."""
    params = []
    for item in raw:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidRequest(f"The filter '{item[:128]}' is invalid: it must be Key=value.")
        params.append((name, value))
    return params
