"""The attributes the archive indexes and how QIDO may use them (Azure's searchable-attribute table)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dicomhub.dicom.names import fold, name_words
from dicomhub.index.records import IndexValues

STUDY, SERIES, INSTANCE = "study", "series", "instance"


@dataclass(frozen=True)
class IndexedAttribute:
    tag: int
    keyword: str
    vr: str
    level: str
    column: str | None  # the study/series column the folded value is stored in (None: computed or path UID)


CORE_ATTRIBUTES: tuple[IndexedAttribute, ...] = (
    IndexedAttribute(0x0020000D, "StudyInstanceUID", "UI", STUDY, None),
    IndexedAttribute(0x00100010, "PatientName", "PN", STUDY, "patient_name"),
    IndexedAttribute(0x00100020, "PatientID", "LO", STUDY, "patient_id"),
    IndexedAttribute(0x00100030, "PatientBirthDate", "DA", STUDY, "patient_birth_date"),
    IndexedAttribute(0x00080050, "AccessionNumber", "SH", STUDY, "accession_number"),
    IndexedAttribute(0x00080090, "ReferringPhysicianName", "PN", STUDY, "referring_physician_name"),
    IndexedAttribute(0x00080020, "StudyDate", "DA", STUDY, "study_date"),
    IndexedAttribute(0x00081030, "StudyDescription", "LO", STUDY, "study_description"),
    IndexedAttribute(0x00080061, "ModalitiesInStudy", "CS", STUDY, None),
    IndexedAttribute(0x0020000E, "SeriesInstanceUID", "UI", SERIES, None),
    IndexedAttribute(0x00080060, "Modality", "CS", SERIES, "modality"),
    IndexedAttribute(0x00400244, "PerformedProcedureStepStartDate", "DA", SERIES, "pps_start_date"),
    IndexedAttribute(0x00081090, "ManufacturerModelName", "LO", SERIES, "manufacturer_model_name"),
    IndexedAttribute(0x00080018, "SOPInstanceUID", "UI", INSTANCE, None),
)
BY_TAG = {a.tag: a for a in CORE_ATTRIBUTES}

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID, PATIENT_ID = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016, 0x00100020
REQUIRED_UIDS = (STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID)

# Computed attributes (PS3.18 / Azure): returned when asked for, never stored.
NUMBER_OF_STUDY_RELATED_SERIES = 0x00201206
NUMBER_OF_STUDY_RELATED_INSTANCES = 0x00201208
NUMBER_OF_SERIES_RELATED_INSTANCES = 0x00201209
MODALITIES_IN_STUDY = 0x00080061


def fold_value(attribute: IndexedAttribute, value: str) -> str:
    """The form a value is indexed and compared in: padding stripped, upper-case, PN without accents."""
    value = value.rstrip("\0 ")
    if attribute.vr == "PN":
        # trailing empty components and groups are insignificant (PS3.5 6.2.1): "Doe^John^^" is "Doe^John"
        return fold("=".join(group.rstrip("^ ") for group in value.split("=")).rstrip("="))
    if attribute.vr in ("UI", "DA"):
        return value
    return value.upper()


def _text(value: Any) -> str:
    """A JSON model value as DICOM text; person names are rebuilt as ``Alphabetic=Ideographic=Phonetic``."""
    if isinstance(value, dict):
        return "=".join(value.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic")).rstrip("=")
    return "" if value is None else str(value)


def indexed_values(model: dict[str, Any]) -> tuple[IndexValues, bool]:
    """The folded index values of an instance, from its stored JSON model (invalid attributes are already out of
    it); the flag tells whether an indexed attribute had several values (only the first is indexed)."""
    values = IndexValues()
    multiple = False
    for attribute in CORE_ATTRIBUTES:
        if attribute.column is None:
            continue
        found = model.get(f"{attribute.tag:08X}", {}).get("Value") or []
        multiple |= len(found) > 1
        folded = fold_value(attribute, _text(found[0])) if found else ""
        (values.study if attribute.level == STUDY else values.series)[attribute.column] = folded or None
        if attribute.vr == "PN" and found:
            words = name_words(_text(found[0]))
            if attribute.tag == 0x00100010:
                values.patient_name_words = words
            else:
                values.referring_physician_words = words
    return values, multiple
