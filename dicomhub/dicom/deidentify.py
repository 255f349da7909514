"""PS3.15 Annex E Basic Application Level Confidentiality Profile, applied to a file header.

The profile's table (E.1-1: which attribute is removed, emptied, replaced by a dummy or given a new UID) comes from
the ``dicom-anonymizer`` package (Kitware), which ships it generated from the standard's own tables per edition;
the actions here are ours, because the export needs what that package's functions do not give: every element at any
depth of sequences, dates and times emptied rather than set to a dummy date, and new UIDs that are the same for one
original UID throughout one export (derived from the export's id, so a task run twice writes the same bytes) and
differ between exports. Every UID that is not a well-known one of the standard is replaced, even outside the table;
private elements are removed; the pixel data is not touched.
"""

from __future__ import annotations

import uuid
from functools import cache

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

PROFILES = ("basic",)
TABLE_EDITION = "dicomfields_2026c"  # the newest edition the package ships
METHOD = "PS3.15 E.1 Basic Application Level Confidentiality Profile (dicomhub)"
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
DATE_TIME_VRS = {"DA", "DT", "TM"}
TEXT_DUMMY_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
# The table's categories by what they do here. X/Z and X/D remove only what a Type 1/2 attribute would need:
# removing is safe for confidentiality, dummies keep files readable where the table allows it.
REMOVE = ("X_TAGS", "X_Z_TAGS", "X_D_TAGS", "X_Z_D_TAGS", "X_Z_U_STAR_TAGS")
EMPTY = ("Z_TAGS",)
DUMMY = ("D_TAGS", "Z_D_TAGS")


@cache
def _actions() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(tag -> action, masked ranges such as (50xx,xxxx) -> action) from the profile's table."""
    tables = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for action, categories in (("remove", REMOVE), ("empty", EMPTY), ("dummy", DUMMY)):
        for category in categories:
            for entry in tables[category]:
                if len(entry) == 2:
                    exact.setdefault((entry[0] << 16) | entry[1], action)
                else:
                    masked.append((*entry, action))
    return exact, masked


def _action(tag: int) -> str | None:
    exact, masked = _actions()
    found = exact.get(tag)
    if found is not None:
        return found
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, g_mask, e_mask, action in masked:
        if group & g_mask == g & g_mask and element & e_mask == e & e_mask:
            return action
    return None


class UidMap:
    """New UIDs for one export: ``2.25.`` + a name-based UUID of (export id, original UID), so the same original
    always maps to the same new UID within the export, and never across exports."""

    def __init__(self, export_id: str) -> None:
        self.namespace = uuid.UUID(export_id)

    def __call__(self, original: str) -> str:
        original = str(original).rstrip(" \0")
        if not original or original in UID_dictionary:  # standard UIDs (SOP classes, syntaxes) identify no one
            return original
        return f"2.25.{uuid.uuid5(self.namespace, original).int}"


def _dummy(elem: DataElement, new_uid: UidMap) -> None:
    vr = elem.VR
    if vr in DATE_TIME_VRS:
        elem.value = ""
    elif vr in TEXT_DUMMY_VRS:
        elem.value = "ANONYMIZED"
    elif vr == "UI":
        elem.value = _new_uids(elem.value, new_uid)
    elif vr == "AS":
        elem.value = "000Y"
    elif vr in ("DS", "IS"):
        elem.value = "0"
    elif vr in ("FD", "FL", "SS", "US", "SL", "UL", "SV", "UV"):
        elem.value = 0
    elif vr == "SQ":
        elem.value = Sequence()
    else:
        elem.value = b"" if vr.startswith("O") or vr == "UN" else ""


def _new_uids(value, new_uid: UidMap):
    if isinstance(value, str):
        return new_uid(value)
    return [new_uid(v) for v in value]


def _clean(ds: Dataset, new_uid: UidMap) -> None:
    """Applies the profile to every element of ``ds`` and of its sequences' items."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        if tag in PIXEL_DATA_TAGS:
            continue
        if elem.tag.is_private:
            del ds[tag]
            continue
        action = _action(int(tag))
        if action == "remove":
            del ds[tag]
        elif action == "empty":
            elem.value = Sequence() if elem.VR == "SQ" else ("" if elem.VR not in ("OB", "OW", "UN") else b"")
        elif action == "dummy":
            _dummy(elem, new_uid)
        elif elem.VR == "UI" and elem.value:
            elem.value = _new_uids(elem.value, new_uid)
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, new_uid)
        elif elem.VR in DATE_TIME_VRS and elem.value:  # dates the table leaves alone still date the patient
            elem.value = ""


def deidentify(ds: Dataset, new_uid: UidMap) -> None:
    """De-identifies a parsed header in place (file meta included) and records how."""
    ds.remove_private_tags()
    _clean(ds, new_uid)
    meta = ds.file_meta
    if "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = new_uid(meta.MediaStorageSOPInstanceUID)
    for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle"):
        if keyword in meta:
            del meta[keyword]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
