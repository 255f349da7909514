"""Value validation of data elements (VR rules from pydicom, plus the checks Azure adds)."""

from __future__ import annotations

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from dicomhub.dicom.tags import format_tag, keyword_of
from dicomhub.dicom.uids import is_valid_uid

_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})
_CONTROL_ALLOWED = {"\x1b"}


def error_comment(tag: int, message: str) -> str:
    """Azure's ErrorComment format: ``DICOM100: (gggg,eeee) - message``."""
    return f"DICOM100: {format_tag(tag)} - {message}"


def values_of(elem: DataElement) -> list:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def element_error(elem: DataElement, trim_nul: bool) -> str | None:
    """The first reason an element's value is invalid, or ``None`` when valid.

    ``trim_nul`` strips trailing NUL padding first (Azure's lenient v2 level); the strict level treats a NUL as an
    invalid character.
    """
    vr = elem.VR
    if vr == "SQ" or vr not in _STRING_VRS | {"FL", "FD", "SL", "SS", "UL", "US", "AT", "LT", "ST", "UT", "UR"}:
        return None
    name = keyword_of(int(elem.tag))
    for value in values_of(elem):
        if isinstance(value, str):
            if trim_nul:
                value = value.rstrip("\0")
            if vr in _STRING_VRS and any(ord(c) < 0x20 and c not in _CONTROL_ALLOWED for c in value):
                return f"Dicom element '{name}' failed validation for VR '{vr}': Value contains invalid character."
            if vr == "UI":
                if value and not is_valid_uid(value):
                    return f"Dicom element '{name}' failed validation for VR 'UI': DICOM Identifier is invalid."
                continue
        try:
            validate_value(vr, str(value) if vr in _STRING_VRS and vr != "PN" else value, config.RAISE)
        except (ValueError, TypeError) as exc:
            return f'Content "{value}" does not validate VR {vr}: {exc}'
    return None


def dataset_errors(ds, trim_nul: bool, skip: frozenset[int] = frozenset()) -> dict[int, str]:
    """Top-level tag -> first error found in it or in any nested sequence item."""
    errors: dict[int, str] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag in skip or elem.tag.element == 0:
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                nested = dataset_errors(item, trim_nul)
                if nested:
                    errors[tag] = next(iter(nested.values()))
                    break
            continue
        try:
            message = element_error(elem, trim_nul)
        except Exception as exc:  # a value pydicom could not even decode
            message = f"Value could not be decoded: {exc}"
        if message:
            errors[tag] = message
    return errors


__all__ = ["dataset_errors", "element_error", "error_comment", "values_of"]
