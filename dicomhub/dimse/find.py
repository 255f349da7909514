"""C-FIND SCP (Patient Root and Study Root): the identifier becomes a QIDO search (``domain/query.py``), so the
matching is QIDO's: wildcards, ranges, UID lists, case-insensitive names, extended query tags.

Keys with a value that the index can match at the query level are filters; every other key is a return key (PS3.4
C.2.2.1.1 lets an SCP treat an optional key it does not match on as a return key). Return values come from the
stored metadata of the row's newest instance and the counts the index keeps, as in QIDO. PATIENT level searches
studies on the patient keys and answers one match per Patient ID.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from dicomhub.dimse.status import IDENTIFIER_MISMATCH, status
from dicomhub.domain.attributes import BY_TAG, PATIENT_ID, SERIES_UID, SOP_UID, STUDY_UID
from dicomhub.domain.errors import InvalidRequest
from dicomhub.domain.extended_tags import attribute_of
from dicomhub.domain.query import MAX_LIMIT, RESOURCES, SearchRequest, parse_search
from dicomhub.index.records import Partition
from dicomhub.index.schema import EXTENDED_READY
from dicomhub.services import Services

log = logging.getLogger(__name__)

API_VERSION = 2  # QIDO's current rules

PATIENT, STUDY_LEVEL, SERIES_LEVEL, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVEL_RESOURCE = {PATIENT: "studies", STUDY_LEVEL: "studies", SERIES_LEVEL: "series", IMAGE: "instances"}
UNIQUE_KEYS = {
    PATIENT: (PATIENT_ID,),
    STUDY_LEVEL: (STUDY_UID,),
    SERIES_LEVEL: (STUDY_UID, SERIES_UID),
    IMAGE: (STUDY_UID, SERIES_UID, SOP_UID),
}
PATIENT_ROOT = frozenset(
    {
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
    }
)
PATIENT_KEYS = frozenset({0x00100010, PATIENT_ID, 0x00100030})  # the patient attributes the index matches
QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
NUMBER_OF_PATIENT_RELATED_STUDIES = 0x00201200
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


class IdentifierError(Exception):
    """The identifier cannot be answered (A900 with the reason)."""


def query_level(identifier: Dataset, sop_class: str) -> str:
    """The Query/Retrieve Level, checked against the information model (PATIENT only in Patient Root)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    allowed = (PATIENT, STUDY_LEVEL, SERIES_LEVEL, IMAGE) if sop_class in PATIENT_ROOT else tuple(UNIQUE_KEYS)[1:]
    if level not in allowed:
        raise IdentifierError(f"Query/Retrieve Level '{level}' is not one of {', '.join(allowed)}.")
    return level


def query_value(elem: DataElement) -> str | None:
    """An identifier element's matching value as QIDO text, or ``None`` for a return key (empty, or a sequence)."""
    if elem.VR == "SQ" or elem.value is None or elem.value == "" or elem.value == []:
        return None
    if isinstance(elem.value, MultiValue | list):
        return "\\".join(str(v) for v in elem.value)
    if isinstance(elem.value, bytes):
        return None
    return str(elem.value)


def find(
    services: Services, partition: Partition, identifier: Dataset, sop_class: str, ae_title: str
) -> Iterator[Dataset]:
    """The matches of a C-FIND identifier, as response identifiers; raises IdentifierError."""
    level = query_level(identifier, sop_class)
    search = _search_request(services, identifier, level)
    if level == PATIENT:
        yield from _patients(services, partition, search, identifier, ae_title)
        return
    for model in _all_results(services, partition, search):
        yield _reply(identifier, model, level, ae_title)


def _search_request(services: Services, identifier: Dataset, level: str) -> SearchRequest:
    resource = LEVEL_RESOURCE[level]
    filter_levels = RESOURCES[resource][1]
    params: list[tuple[str, str]] = []
    include: set[int] = set()
    for elem in identifier:
        tag = int(elem.tag)
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) or elem.tag.element == 0:
            continue
        include.add(tag)
        value = query_value(elem)
        if value is None or not _matchable(services, tag, filter_levels, level):
            continue
        if value.strip("* ") == "" and "*" in value:
            continue  # a lone '*' matches everything: a return key
        params.append((f"{tag:08X}", value))
    try:
        search = parse_search(params, resource, API_VERSION, extended=services.extended_tags.lookup)
    except InvalidRequest as exc:
        raise IdentifierError(str(exc)) from None
    search.include = include
    search.limit = MAX_LIMIT
    return search


def _matchable(services: Services, tag: int, filter_levels: set[str], level: str) -> bool:
    if level == PATIENT:
        return tag in PATIENT_KEYS
    attribute = BY_TAG.get(tag)
    if attribute is not None:
        return attribute.level in filter_levels
    if tag >> 16 & 1:  # private attributes are never indexed
        return False
    extended = services.extended_tags.lookup(tag)
    return (
        extended is not None
        and extended.status == EXTENDED_READY
        and extended.query_enabled
        and attribute_of(extended).level in filter_levels
    )


def _all_results(services: Services, partition: Partition, search: SearchRequest) -> Iterator[dict[str, Any]]:
    """Every match, page by page (QIDO pages hold at most MAX_LIMIT)."""
    while True:
        page = services.query.search(partition, search)
        yield from page
        if len(page) < search.limit:
            return
        search.offset += search.limit


def _patients(
    services: Services, partition: Partition, search: SearchRequest, identifier: Dataset, ae_title: str
) -> Iterator[Dataset]:
    """One match per Patient ID, from its newest study (studies come newest first); its study count."""
    patients: dict[str, tuple[dict[str, Any], int]] = {}
    search.include.add(PATIENT_ID)
    for model in _all_results(services, partition, search):
        values = model.get(f"{PATIENT_ID:08X}", {}).get("Value") or [""]
        first, count = patients.get(values[0], (model, 0))
        patients[values[0]] = (first, count + 1)
    for model, count in patients.values():
        reply = _reply(identifier, model, PATIENT, ae_title)
        if NUMBER_OF_PATIENT_RELATED_STUDIES in identifier:
            reply.NumberOfPatientRelatedStudies = count
        yield reply


def _reply(identifier: Dataset, model: dict[str, Any], level: str, ae_title: str) -> Dataset:
    """The identifier's keys with the match's values (empty when it has none), plus the unique keys."""
    reply = Dataset()
    wanted = [int(e.tag) for e in identifier if int(e.tag) not in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET)]
    for tag in sorted(set(wanted) | set(UNIQUE_KEYS[level])):
        found = _element(model, tag)
        if found is not None:
            reply.add(found)
        elif tag in identifier:
            reply.add_new(tag, identifier[tag].VR, [] if identifier[tag].VR == "SQ" else None)
    reply.QueryRetrieveLevel = level
    if RETRIEVE_AE_TITLE in identifier:
        reply.RetrieveAETitle = ae_title
    if INSTANCE_AVAILABILITY in identifier:
        reply.InstanceAvailability = "ONLINE"
    if any(e.VR in _TEXT_VRS and not str(e.value or "").isascii() for e in reply.iterall()):
        reply.SpecificCharacterSet = "ISO_IR 192"
    return reply


def _element(model: dict[str, Any], tag: int) -> DataElement | None:
    """One attribute of the stored DICOM JSON as an element (a value it cannot convert is left out)."""
    key = f"{tag:08X}"
    if key not in model:
        return None
    try:
        return Dataset.from_json({key: model[key]})[tag]
    except Exception:
        log.warning("stored attribute not convertible for C-FIND", extra={"tag": key})
        return None


def identifier_failure(exc: IdentifierError) -> Dataset:
    return status(IDENTIFIER_MISMATCH, str(exc))
