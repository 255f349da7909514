"""Modality Worklist C-FIND SCP (PS3.4 K.6.1): the worklist service's SCHEDULED workitems (``domain/workitems.py``,
UPS) answered as MWL items, searched with the worklist's own matching.

Mapping (UPS -> MWL): Patient Name/ID, birth date and sex as they are; Accession Number, Requested Procedure ID and
Description from the first Referenced Request; Scheduled Procedure Step Sequence: Scheduled Station AE Title from
the Scheduled Station Name code value, Modality from the Scheduled Station Class code value, start date and time
from Scheduled Procedure Step Start DateTime, description from the Procedure Step Label, protocol codes from the
Scheduled Workitem Code Sequence. The keys that map onto the worklist's search keys are matched there; the others
are return keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomhub.dimse.find import IdentifierError, query_value
from dicomhub.domain.errors import InvalidRequest
from dicomhub.domain.query import MAX_LIMIT
from dicomhub.domain.workitems import SCHEDULED, parse_workitem_query
from dicomhub.index.records import Partition
from dicomhub.services import Services

SPS = "ScheduledProcedureStepSequence"
# MWL matching key -> the worklist search key it is matched as
TOP_LEVEL_KEYS = {
    "PatientName": "PatientName",
    "PatientID": "PatientID",
    "AccessionNumber": "ReferencedRequestSequence.AccessionNumber",
    "RequestedProcedureID": "ReferencedRequestSequence.RequestedProcedureID",
    "StudyInstanceUID": "StudyInstanceUID",
}
STEP_KEYS = {
    "ScheduledStationAETitle": "ScheduledStationNameCodeSequence.CodeValue",
    "Modality": "ScheduledStationClassCodeSequence.CodeValue",
}
START = "ScheduledProcedureStepStartDateTime"


def worklist(services: Services, partition: Partition, identifier: Dataset) -> Iterator[Dataset]:
    """The scheduled workitems matching an MWL identifier, as MWL answers; raises IdentifierError."""
    params = [("ProcedureStepState", SCHEDULED)]
    for keyword, search_key in TOP_LEVEL_KEYS.items():
        if keyword in identifier and (value := _matching(identifier[keyword])) is not None:
            params.append((search_key, value))
    step = _requested_step(identifier)
    for keyword, search_key in STEP_KEYS.items():
        if keyword in step and (value := _matching(step[keyword])) is not None:
            params.append((search_key, value))
    if "ScheduledProcedureStepStartDate" in step and (dates := query_value(step["ScheduledProcedureStepStartDate"])):
        params.append((START, _start_range(dates)))
    try:
        query = parse_workitem_query(params)
    except InvalidRequest as exc:
        raise IdentifierError(str(exc)) from None
    query.include_all, query.limit = True, MAX_LIMIT
    while True:
        page = services.workitems.search(partition, query)
        for model in page:
            yield _answer(identifier, step, _mwl_item(model))
        if len(page) < query.limit:
            return
        query.offset += query.limit


def _requested_step(identifier: Dataset) -> Dataset:
    items = identifier.get(SPS)
    return items[0] if items else Dataset()


def _matching(elem: DataElement) -> str | None:
    value = query_value(elem)
    return None if value is None or (value.strip("* ") == "" and "*" in value) else value


def _start_range(dates: str) -> str:
    """An MWL start date (or date range) as the worklist's DateTime range over whole days."""
    low, dash, high = dates.partition("-")
    if not dash:
        high = low
    return f"{low}-{high + '235959.999999' if high else ''}"


def _mwl_item(model: dict[str, Any]) -> Dataset:
    """A workitem (DICOM JSON) as a complete MWL item."""
    workitem = Dataset.from_json(model)
    item = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        if keyword in workitem:
            item[keyword] = workitem[keyword]
    request = (workitem.get("ReferencedRequestSequence") or [Dataset()])[0]
    for keyword in ("AccessionNumber", "RequestedProcedureID", "RequestedProcedureDescription", "StudyInstanceUID"):
        if keyword in request and keyword not in item:
            item[keyword] = request[keyword]
    if "RequestedProcedureCodeSequence" in request:
        item.RequestedProcedureCodeSequence = request.RequestedProcedureCodeSequence
    step = Dataset()
    step.ScheduledStationAETitle = _code_value(workitem, "ScheduledStationNameCodeSequence")[:16]
    step.Modality = _code_value(workitem, "ScheduledStationClassCodeSequence")[:16]
    start = str(workitem.get(START, "") or "")
    step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime = start[:8], start[8:].split("+")[0]
    step.ScheduledProcedureStepDescription = str(workitem.get("ProcedureStepLabel", "") or "")
    step.ScheduledProcedureStepStatus = SCHEDULED
    if "ScheduledWorkitemCodeSequence" in workitem:
        step.ScheduledProtocolCodeSequence = workitem.ScheduledWorkitemCodeSequence
    item.ScheduledProcedureStepSequence = Sequence([step])
    return item


def _code_value(workitem: Dataset, keyword: str) -> str:
    codes = workitem.get(keyword) or []
    return str(codes[0].get("CodeValue", "") or "") if codes else ""


def _answer(identifier: Dataset, step_keys: Dataset, item: Dataset) -> Dataset:
    """The identifier's keys (and those asked inside its Scheduled Procedure Step item) with the item's values."""
    answer = Dataset()
    for elem in identifier:
        if elem.tag.element == 0 or elem.keyword == "SpecificCharacterSet":
            continue
        if elem.keyword == SPS:
            step = Dataset()
            for key in step_keys:
                found = item[SPS][0].get(key.tag)
                step.add(found if found is not None else DataElement(key.tag, key.VR, None))
            answer[SPS] = DataElement(elem.tag, "SQ", Sequence([step]))
            continue
        answer.add(
            item[elem.tag] if elem.tag in item else DataElement(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)
        )
    if any(e.VR in ("PN", "LO", "SH", "LT") and not str(e.value or "").isascii() for e in answer.iterall()):
        answer.SpecificCharacterSet = "ISO_IR 192"
    return answer
