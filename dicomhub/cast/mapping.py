"""DICOM JSON -> FHIR R4 resources, the mapping rules of Azure's DICOMcast (spec 5.9). Pure functions, no I/O.

Values that cannot be mapped are never replaced by made-up ones: a non-required attribute with an invalid value is
left out and named in the returned problems (Azure's default, EnforceValidationOfTagValues=false); a required one
that is missing or invalid raises ``EntryRejected``, and the entry is skipped.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ACCESSION_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
CONNECTION_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"}
ENDPOINT_NAME = "DICOM WADO-RS endpoint {}"
DOSE_SUMMARY_CODE = {
    "system": "http://loinc.org",
    "code": "73569-6",
    "display": "Radiation exposure and protection information",
}
IRRADIATION_EVENT_CODE = {"system": DCM_SYSTEM, "code": "113852", "display": "Irradiation Event"}

PATIENT_ID = "00100020"
PATIENT_NAME = "00100010"
PATIENT_SEX = "00100040"
PATIENT_BIRTH_DATE = "00100030"
ISSUER_OF_PATIENT_ID = "00100021"
SOP_CLASS_UID = "00080016"
STUDY_DATE, STUDY_TIME, TIMEZONE_OFFSET = "00080020", "00080030", "00080201"
ACCESSION_NUMBER, MODALITY, MODALITIES_IN_STUDY = "00080050", "00080060", "00080061"
STUDY_DESCRIPTION, SERIES_DESCRIPTION = "00081030", "0008103E"
SERIES_DATE, SERIES_TIME = "00080021", "00080031"
SERIES_NUMBER, INSTANCE_NUMBER = "00200011", "00200013"
# structured reports
CONCEPT_NAME, CONTENT, CONCEPT_CODE = "0040A043", "0040A730", "0040A168"
CODE_VALUE, CODING_SCHEME, CODE_MEANING = "00080100", "00080102", "00080104"
MEASURED_VALUES, NUMERIC_VALUE, UNITS = "0040A300", "0040A30A", "004008EA"
TEXT_VALUE, UID_VALUE = "0040A160", "0040A124"

GENDERS = {"M": "male", "F": "female", "O": "other"}
SCHEME_SYSTEMS = {
    "DCM": DCM_SYSTEM,
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}
DOSE_REPORTS = {"113701", "113500"}  # X-Ray Radiation Dose Report, Radiopharmaceutical Radiation Dose Report
IRRADIATION_EVENTS = {"113706", "113819", "113502"}  # X-Ray data, CT Acquisition, Radiopharmaceutical Administration
IRRADIATION_EVENT_UID = "113769"
TARGET_REGION = "123014"
# component code -> kind of value, for the dose summary and for each irradiation event
SUMMARY_COMPONENTS = {
    "113725": "quantity",
    "111637": "quantity",
    "113722": "quantity",
    "113726": "quantity",
    "113727": "quantity",
    "113730": "quantity",
    "113731": "integer",
    "113507": "quantity",
    "113813": "quantity",
    "113812": "integer",
    "113830": "quantity",
    "123005": "quantity",
    "349358000": "text",
    "89457008": "text",
    "410675002": "code",
}
EVENT_COMPONENTS = {"113830": "quantity", "113838": "quantity", "113835": "code"}

_DATE = re.compile(r"(\d{4})(\d{2})?(\d{2})?")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


class EntryRejected(Exception):
    """A required attribute is missing or invalid: the entry cannot be cast."""


@dataclass
class Problems:
    """Invalid non-required attributes left out of the resources, as readable reasons."""

    reasons: list[str] = field(default_factory=list)

    def add(self, keyword: str, tag: str, value: Any, why: str) -> None:
        self.reasons.append(f"{keyword} ({tag[:4]},{tag[4:]}) value {value!r} left out: {why}")


Dataset = dict[str, Any]


def values(ds: Dataset, tag: str) -> list[Any]:
    return (ds.get(tag) or {}).get("Value") or []


def first(ds: Dataset, tag: str) -> Any:
    found = values(ds, tag)
    return found[0] if found else None


def text(ds: Dataset, tag: str) -> str | None:
    value = first(ds, tag)
    value = str(value).strip() if value is not None else ""
    return value or None


def uid_identifier(uid: str) -> dict:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def reference(resource_type: str, id: str) -> dict:
    return {"reference": f"{resource_type}/{id}"}


# -- values -----------------------------------------------------------------------------------------------------------
def human_name(pn: Any) -> dict | None:
    """PN -> HumanName: family = component 1, given = components 2 and 3 split on spaces, prefix 4, suffix 5."""
    alphabetic = pn.get("Alphabetic") if isinstance(pn, dict) else pn
    if not alphabetic or not str(alphabetic).strip("^ "):
        return None
    parts = (str(alphabetic).split("^") + [""] * 5)[:5]
    name: dict[str, Any] = {"use": "usual"}
    if parts[0].strip():
        name["family"] = parts[0].strip()
    given = parts[1].split() + parts[2].split()
    if given:
        name["given"] = given
    if parts[3].strip():
        name["prefix"] = parts[3].split()
    if parts[4].strip():
        name["suffix"] = parts[4].split()
    return name


def gender(sex: str | None) -> str | None:
    """M/F/O -> male/female/other; empty -> None; anything else -> ValueError."""
    if not sex:
        return None
    if sex.upper() not in GENDERS:
        raise ValueError("not one of M, F, O")
    return GENDERS[sex.upper()]


def fhir_date(da: str) -> str:
    """DA (also partial: YYYY, YYYYMM) -> FHIR date."""
    match = _DATE.fullmatch(da.strip())
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError("not a DICOM date")
    year, month, day = match.groups()
    if month and not 1 <= int(month) <= 12 or day and not 1 <= int(day) <= 31:
        raise ValueError("not a DICOM date")
    return "-".join(p for p in (year, month, day) if p)


def utc_offset(value: str | None) -> str | None:
    """TimezoneOffsetFromUTC ``+hhmm`` / ``-hhmm`` -> ``+hh:mm``."""
    match = _OFFSET.fullmatch((value or "").strip())
    if not match:
        return None
    return f"{match.group(1)}{match.group(2)}:{match.group(3)}"


def fhir_datetime(da: str, tm: str | None, offset: str | None) -> str:
    """DA + TM -> FHIR dateTime. A partial date stays partial (no time); a time needs a zone in FHIR: the study's
    TimezoneOffsetFromUTC, else UTC."""
    date = fhir_date(da)
    if not tm or len(date) < 10:
        return date
    match = _TIME.fullmatch(tm.strip())
    if not match:
        raise ValueError("not a DICOM time")
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        raise ValueError("not a DICOM time")
    return f"{date}T{hours}:{minutes or '00'}:{seconds or '00'}{fraction or ''}{offset or 'Z'}"


def _checked(problems: Problems, keyword: str, tag: str, raw: Any, convert) -> Any:
    try:
        return convert()
    except ValueError as exc:
        problems.add(keyword, tag, raw, str(exc))
        return None


def _integer(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError("not an integer") from None


def _started(ds: Dataset, date_tag: str, time_tag: str, problems: Problems, keyword: str) -> str | None:
    da = text(ds, date_tag)
    if da is None:
        return None
    tm, offset = text(ds, time_tag), utc_offset(text(ds, TIMEZONE_OFFSET))
    return _checked(problems, keyword, date_tag, f"{da} {tm or ''}".strip(), lambda: fhir_datetime(da, tm, offset))


# -- Patient ----------------------------------------------------------------------------------------------------------
def patient_identifier(ds: Dataset, system: str, use_issuer: bool) -> dict:
    patient_id = text(ds, PATIENT_ID)
    if patient_id is None:
        raise EntryRejected("PatientID (0010,0020) is missing: the Patient cannot be identified")
    issuer = text(ds, ISSUER_OF_PATIENT_ID) if use_issuer else system
    return {"system": issuer, "value": patient_id} if issuer else {"value": patient_id}


def _escape_token(value: str) -> str:
    for special in ("\\", "|", ",", "$"):
        value = value.replace(special, "\\" + special)
    return value


def identifier_query(identifier: dict) -> str:
    """``system|value`` (or the value alone without a system) as a search token, escaped."""
    value = _escape_token(identifier["value"])
    return f"{_escape_token(identifier['system'])}|{value}" if identifier.get("system") else value


def patient_resource(existing: dict | None, identifier: dict, ds: Dataset, problems: Problems) -> dict:
    """The Patient with this dataset's name, gender and birth date; other fields of ``existing`` are kept."""
    patient = copy.deepcopy(existing) if existing else {"resourceType": "Patient", "identifier": [identifier]}
    name = human_name(first(ds, PATIENT_NAME))
    if name is not None:
        others = [n for n in patient.get("name", []) if n.get("use") != "usual"]
        patient["name"] = [name, *others]
    sex = text(ds, PATIENT_SEX)
    value = _checked(problems, "PatientSex", PATIENT_SEX, sex, lambda: gender(sex))
    if value is not None:
        patient["gender"] = value
    birth = text(ds, PATIENT_BIRTH_DATE)
    if birth is not None:
        date = _checked(problems, "PatientBirthDate", PATIENT_BIRTH_DATE, birth, lambda: fhir_date(birth))
        if date is not None:
            patient["birthDate"] = date
    return patient


# -- Endpoint ---------------------------------------------------------------------------------------------------------
def endpoint_resource(address: str) -> dict:
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": CONNECTION_TYPE,
        "name": ENDPOINT_NAME.format(address),
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


# -- ImagingStudy -----------------------------------------------------------------------------------------------------
def _coding(system: str, code: str) -> dict:
    return {"system": system, "code": code}


def _replace_accession(identifiers: list[dict], accession: str | None) -> list[dict]:
    if accession is None:
        return identifiers
    kept = [i for i in identifiers if i.get("type") != ACCESSION_TYPE]
    return [*kept, {"type": ACCESSION_TYPE, "value": accession}]


def _recount(study: dict, listed_modalities: list[str] = ()) -> dict:
    """Counts and study modalities (the series' own, then those ModalitiesInStudy lists) follow the resource's
    series and instances."""
    series = study.get("series", [])
    for s in series:
        s["numberOfInstances"] = len(s.get("instance", []))
    study["numberOfSeries"] = len(series)
    study["numberOfInstances"] = sum(s["numberOfInstances"] for s in series)
    modalities: list[dict] = []
    for coding in [s["modality"] for s in series] + [_coding(DCM_SYSTEM, m) for m in listed_modalities]:
        if coding not in modalities:
            modalities.append(coding)
    if modalities:
        study["modality"] = modalities
    else:
        study.pop("modality", None)
    return study


def study_resource(
    existing: dict | None,
    ds: Dataset,
    study_uid: str,
    patient: dict,
    endpoint: dict,
    source: str,
    problems: Problems,
) -> dict:
    """The ImagingStudy with this instance merged in (its series and instance added or refreshed)."""
    series_uid, sop_uid = text(ds, "0020000E"), text(ds, "00080018")
    modality, sop_class = text(ds, MODALITY), text(ds, SOP_CLASS_UID)
    if modality is None:
        raise EntryRejected("Modality (0008,0060) is missing: the series cannot be described")
    if sop_class is None:
        raise EntryRejected("SOPClassUID (0008,0016) is missing: the instance cannot be described")
    study = (
        copy.deepcopy(existing)
        if existing
        else {
            "resourceType": "ImagingStudy",
            "meta": {"source": source},
            "identifier": [uid_identifier(study_uid)],
        }
    )
    study["status"] = "available"
    study["identifier"] = _replace_accession(study.get("identifier", []), text(ds, ACCESSION_NUMBER))
    study["subject"] = patient
    if endpoint not in study.setdefault("endpoint", []):
        study["endpoint"].append(endpoint)
    started = _started(ds, STUDY_DATE, STUDY_TIME, problems, "StudyDate/StudyTime")
    if started:
        study["started"] = started
    description = text(ds, STUDY_DESCRIPTION)
    if description and {"text": description} not in study.get("note", []):
        study.setdefault("note", []).append({"text": description})
    series = next((s for s in study.setdefault("series", []) if s["uid"] == series_uid), None)
    if series is None:
        series = {"uid": series_uid}
        study["series"].append(series)
    series["modality"] = _coding(DCM_SYSTEM, modality)
    number = first(ds, SERIES_NUMBER)
    if number is not None:
        number = _checked(problems, "SeriesNumber", SERIES_NUMBER, number, lambda: _integer(number))
        if number is not None:
            series["number"] = number
    if text(ds, SERIES_DESCRIPTION):
        series["description"] = text(ds, SERIES_DESCRIPTION)
    series_started = _started(ds, SERIES_DATE, SERIES_TIME, problems, "SeriesDate/SeriesTime")
    if series_started:
        series["started"] = series_started
    instance = next((i for i in series.setdefault("instance", []) if i["uid"] == sop_uid), None)
    if instance is None:
        instance = {"uid": sop_uid}
        series["instance"].append(instance)
    instance["sopClass"] = _coding("urn:ietf:rfc:3986", f"urn:oid:{sop_class}")
    number = first(ds, INSTANCE_NUMBER)
    if number is not None:
        number = _checked(problems, "InstanceNumber", INSTANCE_NUMBER, number, lambda: _integer(number))
        if number is not None:
            instance["number"] = number
    return _recount(study, [str(m) for m in values(ds, MODALITIES_IN_STUDY)])


def without_instance(study: dict, series_uid: str, sop_uid: str) -> dict | None:
    """The ImagingStudy with the instance removed and its series dropped when emptied; None if it was not there."""
    result = copy.deepcopy(study)
    for series in result.get("series", []):
        if series["uid"] != series_uid:
            continue
        kept = [i for i in series.get("instance", []) if i["uid"] != sop_uid]
        if len(kept) == len(series.get("instance", [])):
            return None
        series["instance"] = kept
        break
    else:
        return None
    result["series"] = [s for s in result["series"] if s.get("instance")]
    if not result["series"]:
        result.pop("series")
    return _recount(result)


# -- Observations (radiation dose SRs) --------------------------------------------------------------------------------
def _code_of(item: Dataset, tag: str = CONCEPT_NAME) -> tuple[str, str, str] | None:
    code = first(item, tag)
    if not isinstance(code, dict) or text(code, CODE_VALUE) is None:
        return None
    return text(code, CODE_VALUE), text(code, CODING_SCHEME) or "", text(code, CODE_MEANING) or ""


def _concept(code: tuple[str, str, str]) -> dict:
    value, scheme, meaning = code
    coding = {"system": SCHEME_SYSTEMS.get(scheme.upper(), scheme), "code": value}
    if meaning:
        coding["display"] = meaning
    return {"coding": [coding]}


def _items(node: Dataset) -> list[Dataset]:
    return [i for i in values(node, CONTENT) if isinstance(i, dict)]


def _find(node: Dataset, code: str) -> Dataset | None:
    """The first content item (depth first) whose concept name is ``code``."""
    for item in _items(node):
        found_code = _code_of(item)
        if found_code and found_code[0] == code:
            return item
        deeper = _find(item, code)
        if deeper is not None:
            return deeper
    return None


def _component(item: Dataset, code: tuple[str, str, str], kind: str) -> dict | None:
    component: dict[str, Any] = {"code": _concept(code)}
    if kind in ("quantity", "integer"):
        measured = first(item, MEASURED_VALUES)
        number = first(measured, NUMERIC_VALUE) if isinstance(measured, dict) else None
        if number is None:
            return None
        try:
            number = float(number)
        except ValueError:
            return None
        if kind == "integer":
            component["valueInteger"] = int(number)
        else:
            unit = _code_of(measured, UNITS)
            component["valueQuantity"] = {"value": number}
            if unit:
                component["valueQuantity"].update(
                    {"unit": unit[0], "system": SCHEME_SYSTEMS.get(unit[1].upper(), unit[1]), "code": unit[0]}
                )
    elif kind == "text":
        value = text(item, TEXT_VALUE)
        if value is None:
            return None
        component["valueString"] = value
    else:
        value_code = _code_of(item, CONCEPT_CODE)
        if value_code is None:
            return None
        component["valueCodeableConcept"] = _concept(value_code)
    return component


def _components(node: Dataset, wanted: dict[str, str]) -> list[dict]:
    found = []
    for code, kind in wanted.items():
        item = _find(node, code)
        item_code = _code_of(item) if item is not None else None
        component = _component(item, item_code, kind) if item_code else None
        if component is not None:
            found.append(component)
    return found


def _events(node: Dataset) -> list[Dataset]:
    events = []
    for item in _items(node):
        code = _code_of(item)
        if code and code[0] in IRRADIATION_EVENTS:
            events.append(item)
        else:
            events.extend(_events(item))
    return events


def dose_observations(ds: Dataset, patient: dict, study: dict, study_uid: str, sop_uid: str) -> list[dict]:
    """A dose summary (LOINC 73569-6) for an X-Ray or radiopharmaceutical dose report, and one Observation (DCM
    113852) per irradiation event with an Irradiation Event UID. Each carries the SR's SOP Instance UID as an
    identifier, so the Observations of a deleted report can be found."""
    code = _code_of(ds)
    if code is None or code[0] not in DOSE_REPORTS:
        return []
    report_identifier = uid_identifier(sop_uid)
    summary_identifiers = [uid_identifier(study_uid), report_identifier]
    accession = text(ds, ACCESSION_NUMBER)
    if accession:
        summary_identifiers.append({"type": ACCESSION_TYPE, "value": accession})
    observations = [
        {
            "resourceType": "Observation",
            "status": "preliminary",
            "identifier": summary_identifiers,
            "code": {"coding": [DOSE_SUMMARY_CODE]},
            "subject": patient,
            "partOf": [study],
            "component": _components(ds, SUMMARY_COMPONENTS),
        }
    ]
    for event in _events(ds):
        uid_item = _find(event, IRRADIATION_EVENT_UID)
        event_uid = text(uid_item, UID_VALUE) if uid_item is not None else None
        if event_uid is None:
            continue
        observation = {
            "resourceType": "Observation",
            "status": "preliminary",
            "identifier": [uid_identifier(event_uid), report_identifier],
            "code": {"coding": [IRRADIATION_EVENT_CODE]},
            "subject": patient,
            "partOf": [study],
            "component": _components(event, EVENT_COMPONENTS),
        }
        region_item = _find(event, TARGET_REGION)
        region = _code_of(region_item, CONCEPT_CODE) if region_item is not None else None
        if region:
            observation["bodySite"] = _concept(region)
        observations.append(observation)
    for observation in observations:
        if not observation["component"]:
            observation.pop("component")
    return observations
