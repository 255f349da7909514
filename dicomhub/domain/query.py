"""QIDO: parse a search request into index filters (Azure's rules, plus PS3.18 wildcards and UID lists) and build
the response datasets from the stored metadata."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson
from pydicom.datadict import tag_for_keyword

from dicomhub.dicom.names import name_words
from dicomhub.dicom.tags import parse_attribute_id, tag_key
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid, normalize_uid
from dicomhub.domain.attributes import (
    BY_TAG,
    INSTANCE,
    MODALITIES_IN_STUDY,
    NUMBER_OF_SERIES_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_SERIES,
    SERIES,
    SERIES_UID,
    SOP_UID,
    STUDY,
    STUDY_UID,
    IndexedAttribute,
    fold_value,
)
from dicomhub.domain.errors import InvalidRequest
from dicomhub.domain.extended_tags import attribute_of, normalize_datetime, normalize_time, single_precision
from dicomhub.index import qido
from dicomhub.index.extended_tags import ExtendedTag
from dicomhub.index.records import ExtendedColumn, Partition, QidoQuery, QidoRow, QueryFilter
from dicomhub.index.repository import Index
from dicomhub.index.schema import EXTENDED_READY

MAX_LIMIT = 200
DEFAULT_LIMIT = 100


def _tags(*keywords: str) -> tuple[int, ...]:
    return tuple(int(tag_for_keyword(k)) for k in keywords)


DEFAULTS_V2 = {
    STUDY: _tags(
        "StudyInstanceUID",
        "StudyDate",
        "StudyDescription",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
    ),
    SERIES: _tags("SeriesInstanceUID", "Modality", "PerformedProcedureStepStartDate", "ManufacturerModelName"),
    INSTANCE: _tags("SOPInstanceUID"),
}
DEFAULTS_V1 = {
    STUDY: _tags(
        "SpecificCharacterSet",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ReferringPhysicianName",
        "TimezoneOffsetFromUTC",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "StudyInstanceUID",
    ),
    SERIES: _tags(
        "SpecificCharacterSet",
        "Modality",
        "TimezoneOffsetFromUTC",
        "SeriesDescription",
        "SeriesInstanceUID",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "RequestAttributesSequence",
    ),
    INSTANCE: _tags(
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "TimezoneOffsetFromUTC",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
ALL_EXTRAS = {
    STUDY: _tags(
        "StudyDescription",
        "AnatomicRegionsInStudyCodeSequence",
        "ProcedureCodeSequence",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
        "ReferencedStudySequence",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "Occupation",
        "AdditionalPatientHistory",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    SERIES: _tags("SeriesNumber", "Laterality", "SeriesDate", "SeriesTime", "NumberOfSeriesRelatedInstances"),
    INSTANCE: (),
}
# Attributes computed from the index rather than read from the stored metadata, by the level whose rows carry them.
# v2 returns them by default, as PS3.18's default sets (Tables 6.7.1-2 and 6.7.1-2a) do and viewers expect (OHIF
# lists studies by them); v1 keeps Azure's default set (spec 4.5).
COMPUTED = {
    STUDY: (MODALITIES_IN_STUDY, NUMBER_OF_STUDY_RELATED_SERIES, NUMBER_OF_STUDY_RELATED_INSTANCES),
    SERIES: (NUMBER_OF_SERIES_RELATED_INSTANCES,),
}

# resource -> (result level, levels whose attributes may filter, levels whose default attributes are returned)
RESOURCES = {
    "studies": (STUDY, {STUDY}, (STUDY,)),
    "series": (SERIES, {STUDY, SERIES}, (STUDY, SERIES)),
    "instances": (INSTANCE, {STUDY, SERIES, INSTANCE}, (STUDY, SERIES, INSTANCE)),
    "study-series": (SERIES, {SERIES}, (SERIES,)),
    "study-instances": (INSTANCE, {SERIES, INSTANCE}, (SERIES, INSTANCE)),
    "series-instances": (INSTANCE, {INSTANCE}, (INSTANCE,)),
}
CONTROL_PARAMS = {"limit", "offset", "includefield", "fuzzymatching"}
_DATE = re.compile(r"[0-9]{8}")
_INTEGER = re.compile(r"-?[0-9]{1,20}")


@dataclass
class SearchRequest:
    resource: str
    api_version: int
    filters: list[QueryFilter] = field(default_factory=list)
    filter_tags: list[int] = field(default_factory=list)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    erroneous: list[str] = field(default_factory=list)  # extended tags queried although their index has errors


def invalid_parameter(name: str, detail: str) -> InvalidRequest:
    return InvalidRequest(f"The query parameter '{name}' is invalid. {detail}")


def parse_search(
    params: list[tuple[str, str]],
    resource: str,
    api_version: int,
    study_uid: str | None = None,
    series_uid: str | None = None,
    extended: Callable[[int], ExtendedTag | None] | None = None,
) -> SearchRequest:
    """Turns query parameters (in order, repeats kept) into a :class:`SearchRequest`; raises InvalidRequest.

    ``extended`` looks up the extended query tag of an attribute outside the core table.
    """
    _, filter_levels, _ = RESOURCES[resource]
    request = SearchRequest(resource, api_version)
    fuzzy = False
    seen_names: set[str] = set()
    seen_tags: set[int] = set()
    raw_filters: list[tuple[IndexedAttribute, str, str, ExtendedColumn | None]] = []
    seen_controls: set[str] = set()
    for name, value in params:
        lower = name.lower()
        if lower in CONTROL_PARAMS:
            control, parsed = parse_control(name, value, seen_controls)
            if control == "includefield":
                _parse_includefield(request, value)
            elif control == "fuzzymatching":
                fuzzy = bool(parsed)
            else:
                setattr(request, control, parsed)
            continue
        if name in seen_names:
            raise InvalidRequest(f"Duplicate AttributeId '{name}'. Each attribute is only supported once.")
        seen_names.add(name)
        tag = parse_attribute_id(name)
        if tag is None:
            raise InvalidRequest(
                f"Invalid query: unknown query parameter '{name}'. "
                "If the parameter is an attribute keyword, check the casing."
            )
        if tag in seen_tags:
            raise InvalidRequest(f"Invalid query: AttributeId '{name}' is specified more than once.")
        seen_tags.add(tag)
        attribute, column = BY_TAG.get(tag), None
        if attribute is None and extended is not None:
            attribute, column = _extended_attribute(extended(tag), name, request)
        if attribute is None or attribute.level not in filter_levels:
            raise InvalidRequest(f"Invalid query: AttributeId {name} is not queryable. ")
        if not value.strip():
            raise empty_value(name)
        raw_filters.append((attribute, name, value, column))
    for attribute, name, value, column in raw_filters:
        condition = attribute_filter(attribute, name, value, fuzzy)
        request.filters.append(replace(condition, extended=column) if column else condition)
        request.filter_tags.append(attribute.tag)
    if study_uid is not None:
        request.filters.append(QueryFilter(STUDY_UID, "exact", (normalize_uid(study_uid),)))
        request.filter_tags.append(STUDY_UID)
    if series_uid is not None:
        request.filters.append(QueryFilter(SERIES_UID, "exact", (normalize_uid(series_uid),)))
        request.filter_tags.append(SERIES_UID)
    return request


def _extended_attribute(
    tag: ExtendedTag | None, name: str, request: SearchRequest
) -> tuple[IndexedAttribute | None, ExtendedColumn | None]:
    """A ready extended tag as a query attribute (tags still being added are not queryable)."""
    if tag is None or tag.status != EXTENDED_READY:
        return None, None
    if not tag.query_enabled:
        raise InvalidRequest(f"Query is disabled on specified attribute '{name}'.")
    if tag.error_count:
        request.erroneous.append(tag.path)
    return attribute_of(tag), ExtendedColumn(tag.key, tag.level, tag.kind)


def empty_value(name: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid query: AttributeId '{name}' has empty string value that is not supported.")


def parse_control(name: str, value: str, seen: set[str]) -> tuple[str, int | bool | str]:
    """One paging/matching control of a search (``limit``, ``offset``, ``fuzzymatching``, ``includefield``), checked
    as QIDO checks it; returns the control's lower-case name and its parsed value. Only includefield may repeat."""
    lower = name.lower()
    if lower != "includefield":
        if lower in seen:
            raise invalid_parameter(name, "The parameter is specified more than once.")
        seen.add(lower)
    if lower == "limit":
        return lower, parse_bounded_int("Limit", value, 1, MAX_LIMIT, "The field Limit must be between 1 and 200.")
    if lower == "offset":
        return lower, parse_bounded_int("Offset", value, 0, 2**63 - 1, "The field Offset must be 0 or greater.")
    if lower == "fuzzymatching":
        if value.lower() not in ("true", "false"):
            raise invalid_parameter(name, "The value must be 'true' or 'false'.")
        return lower, value.lower() == "true"
    return lower, value


def parse_bounded_int(name: str, value: str, low: int, high: int, detail: str) -> int:
    if not _INTEGER.fullmatch(value):  # plain ASCII digits only: int() would also take "1_0", " 5" or "５"
        raise invalid_parameter(name, detail)
    number = int(value)
    if not low <= number <= high:
        raise invalid_parameter(name, detail)
    return number


def _parse_includefield(request: SearchRequest, value: str) -> None:
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if item.lower() == "all":
            request.include_all = True
            continue
        tag = parse_attribute_id(item)
        if tag is None:
            raise invalid_parameter("includefield", f"The attribute '{item}' in includefield is unknown.")
        request.include.add(tag)
    if request.include_all and request.include:
        raise invalid_parameter("includefield", "The query cannot specify included fields in addition to 'all'.")


def attribute_filter(attribute: IndexedAttribute, name: str, value: str, fuzzy: bool) -> QueryFilter:
    tag = attribute.tag
    value = value.rstrip("\0")
    if attribute.vr == "UI":
        uids = [normalize_uid(v) for v in re.split(r"[,\\]", value) if v.strip()]
        if not uids:
            raise empty_value(name)
        for uid in uids:
            if not is_valid_uid(uid):
                raise InvalidRequest(f"Invalid query: the {name} '{uid}' is invalid. {INVALID_UID_MESSAGE}")
        return QueryFilter(tag, "list", tuple(uids)) if len(uids) > 1 else QueryFilter(tag, "exact", (uids[0],))
    if attribute.vr == "DA":
        return _range_filter(tag, name, value, _check_date)
    if attribute.vr not in ("DA", "UI") and "*" in value and not value.strip("* "):
        return QueryFilter(tag, "universal")  # PS3.4 C.2.2.2.4: a lone '*' matches every value, empty ones too
    if attribute.vr in ("DT", "TM"):
        return _range_filter(tag, name, value, _time_parser(attribute.vr))
    if attribute.vr in _NUMERIC_VRS:
        return QueryFilter(tag, "exact", (_number(attribute.vr, name, value),))
    if tag == MODALITIES_IN_STUDY:
        values = [v.strip().upper() for v in re.split(r"[,\\]", value) if v.strip()]
        if not values:
            raise empty_value(name)
        return QueryFilter(tag, "list", tuple(values)) if len(values) > 1 else _string_filter(tag, values[0])
    if attribute.vr == "PN" and fuzzy:
        if '"' in value:
            raise InvalidRequest(f"Invalid query: the value of '{name}' contains a '\"', which fuzzy matching rejects.")
        words = name_words(value)
        if not words:
            raise empty_value(name)
        return QueryFilter(tag, "fuzzy", tuple(words))
    return _string_filter(tag, fold_value(attribute, value))


def _range_filter(tag: int, name: str, value: str, parse: Callable[[str, str], str]) -> QueryFilter:
    """DA, DT and TM: an exact value or an inclusive range ``low-high`` (either end may be left open)."""
    if "-" not in value:
        return QueryFilter(tag, "exact", (parse(value, name),))
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    if not low and not high:
        raise InvalidRequest(f"Invalid query: Both parts in the range cannot be empty for attribute '{name}'.")
    low, high = (parse(low, name) if low else ""), (parse(high, name) if high else "")
    if low and high and low > high:
        raise InvalidRequest(
            f"Invalid query: The start of the range '{low}' is after its end '{high}' for attribute '{name}'."
        )
    return QueryFilter(tag, "range", low=low, high=high)


def _time_parser(vr: str) -> Callable[[str, str], str]:
    """DT/TM query values in the form they are indexed in (see domain/extended_tags.py)."""

    def parse(value: str, name: str) -> str:
        if vr == "DT" and "+" in value:
            raise InvalidRequest(
                f"Invalid query: specified DateTime value '{value}' of attribute '{name}' contains offset which is "
                "not supported."
            )
        normalized = normalize_datetime(value) if vr == "DT" else normalize_time(value)
        if normalized is None:
            formats = "yyyy[MM[dd[HH[mm[ss[.FFFFFF]]]]]]" if vr == "DT" else "HH[mm[ss[.FFFFFF]]]"
            raise InvalidRequest(
                f"Invalid query: specified {'DateTime' if vr == 'DT' else 'Time'} value '{value}' is invalid for "
                f"attribute '{name}'. It should be formatted as {formats}."
            )
        return normalized

    return parse


_NUMERIC_VRS = {"IS": int, "SL": int, "SS": int, "UL": int, "US": int, "FL": float, "FD": float}


def _number(vr: str, name: str, value: str) -> str:
    try:
        number = _NUMERIC_VRS[vr](value.strip())
    except ValueError:
        raise InvalidRequest(
            f"Invalid query: specified value '{value}' is not a valid {vr} value for '{name}'."
        ) from None
    return repr(single_precision(number) if vr == "FL" else number)


def _string_filter(tag: int, folded: str) -> QueryFilter:
    return QueryFilter(tag, "wildcard" if ("*" in folded or "?" in folded) else "exact", (folded,))


def _check_date(value: str, name: str) -> str:
    try:
        if not _DATE.fullmatch(value):
            raise ValueError
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise InvalidRequest(
            f"Invalid query: specified Date value '{value}' is invalid for attribute '{name}'. "
            "Date should be valid and formatted as yyyyMMdd."
        ) from None
    return value


def _computed(level: str, row: QidoRow, modalities: dict[int, list[str]]) -> dict[int, tuple[str, list | None]]:
    """The computed attributes of a result row (VR, values): the counts the index keeps on each study and series row
    (the one source of them, whether asked by default or by includefield)."""
    if level == STUDY:
        return {
            MODALITIES_IN_STUDY: ("CS", modalities.get(row.study_key)),
            NUMBER_OF_STUDY_RELATED_SERIES: ("IS", [row.series_count]),
            NUMBER_OF_STUDY_RELATED_INSTANCES: ("IS", [row.instance_count]),
        }
    if level == SERIES:
        return {NUMBER_OF_SERIES_RELATED_INSTANCES: ("IS", [row.instance_count])}
    return {}


class QueryService:
    def __init__(self, index: Index) -> None:
        self.index = index

    def search(self, partition: Partition, request: SearchRequest) -> list[dict[str, Any]]:
        level, _, return_levels = RESOURCES[request.resource]
        wanted = self._wanted_tags(request, return_levels)
        rows, modalities = qido.search(
            self.index,
            QidoQuery(level, partition.key, tuple(request.filters), request.limit, request.offset),
            with_modalities=level == STUDY and MODALITIES_IN_STUDY in wanted,
        )
        if not rows:
            return []
        keys = sorted(tag_key(t) for t in wanted)
        results = []
        for row in rows:
            model = orjson.loads(row.document)
            out = {key: model[key] for key in keys if key in model}
            for tag, (vr, found) in _computed(level, row, modalities).items():
                if tag in wanted and found:
                    out[tag_key(tag)] = {"vr": vr, "Value": found}
            results.append(dict(sorted(out.items())))
        return results

    @staticmethod
    def _wanted_tags(request: SearchRequest, return_levels: tuple[str, ...]) -> set[int]:
        defaults = DEFAULTS_V1 if request.api_version < 2 or request.include_all else DEFAULTS_V2
        wanted: set[int] = set()
        for lvl in return_levels:
            wanted.update(defaults[lvl])
            if request.include_all:
                wanted.update(ALL_EXTRAS[lvl])
        wanted.update(request.include)
        wanted.update(request.filter_tags)
        level = RESOURCES[request.resource][0]
        if request.api_version >= 2 and not request.include_all:
            wanted.update(COMPUTED.get(level, ()))
        wanted.update(
            {STUDY_UID}
            if level == STUDY
            else {STUDY_UID, SERIES_UID}
            if level == SERIES
            else {STUDY_UID, SERIES_UID, SOP_UID}
        )
        return wanted
