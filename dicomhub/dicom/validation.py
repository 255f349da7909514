"""Value validation of data elements (VR rules from pydicom, plus the checks Azure adds)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import (
    MAX_VALUE_LEN,
    STR_VR_REGEXES,
    VALIDATORS,
    validate_length_and_type_and_regex,
    validate_type_and_length,
    validate_type_and_regex,
    validate_value,
)

from dicomhub.dicom.tags import format_tag, keyword_of
from dicomhub.dicom.uids import is_valid_uid

_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})
_CONTROL_ALLOWED = {"\x1b"}
_DATE = re.compile(r"[0-9]{8}", re.ASCII)
_PYDICOM_HINT = re.compile(r"\s*Please see <[^>]*> for allowed values for each VR\.?")
DA_PATTERN_MESSAGE = "one of the date values does not match the pattern YYYYMMDD"


def invalid_character(name: str, vr: str) -> str:
    return f"Dicom element '{name}' failed validation for VR '{vr}': Value contains invalid character."


def _is_date(value: str) -> bool:
    """A DA value is a real calendar date written as YYYYMMDD (no ranges, no separators)."""
    if not _DATE.fullmatch(value):
        return False
    try:  # what strptime's %Y%m%d accepts, a tenth of its cost
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


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
    try:
        values = values_of(elem)
    except Exception as exc:  # a value pydicom cannot even decode
        return undecodable(int(elem.tag), exc)
    for value in values:
        if isinstance(value, str):
            if trim_nul:
                value = value.rstrip("\0")
            if vr in _STRING_VRS and any(ord(c) < 0x20 and c not in _CONTROL_ALLOWED for c in value):
                return invalid_character(name, vr)
            if vr == "UI":
                if value and not is_valid_uid(value):
                    return f"Dicom element '{name}' failed validation for VR 'UI': DICOM Identifier is invalid."
                continue
            if vr == "DA":
                if value.strip() and not _is_date(value.strip()):
                    return f'Content "{value}" does not validate VR DA: {DA_PATTERN_MESSAGE}'
                continue
        try:
            validate_value(vr, str(value) if vr in _STRING_VRS and vr != "PN" else value, config.RAISE)
        except (ValueError, TypeError) as exc:
            return f'Content "{value}" does not validate VR {vr}: {_PYDICOM_HINT.sub("", str(exc))}'
    return None


def _pattern_rules() -> dict[str, tuple[int, re.Pattern[str] | None]]:
    """VR -> (maximum length or 0, pattern or None), for the VRs pydicom checks by length and/or pattern only.

    Taken from pydicom's own tables, so :func:`text_values_valid` agrees with :func:`element_error` (which asks
    pydicom); a VR whose pydicom check is anything else is not listed, and its values are never called valid here.
    """
    checks = {
        validate_length_and_type_and_regex: (True, True),
        validate_type_and_regex: (False, True),
        validate_type_and_length: (True, False),
    }
    rules: dict[str, tuple[int, re.Pattern[str] | None]] = {}
    for vr, validator in VALIDATORS.items():
        length, pattern = checks.get(validator, (False, False))
        if length or pattern:
            rules[vr] = (MAX_VALUE_LEN.get(vr, 0) if length else 0, STR_VR_REGEXES[vr] if pattern else None)
    # TM and DT: a string value is checked against the pattern only (pydicom's validate_date_time)
    for vr in ("TM", "DT"):
        rules[vr] = (0, STR_VR_REGEXES[vr])
    return rules


_PATTERN_RULES = _pattern_rules()


def text_values_valid(vr: str, values: list[str]) -> bool:
    """True when :func:`element_error` finds nothing wrong with these values of a text VR, decoded from printable
    ASCII (so free of control characters, NUL padding stripped). False means invalid *or unsure*: the caller then
    asks :func:`element_error` for the message. This check costs a fraction of a pydicom conversion and validation,
    and runs on every element of every stored instance."""
    if vr == "PN":
        return True  # pydicom accepts any decoded person name; element_error checks names for control characters only
    if vr == "UI":
        return all(not v or is_valid_uid(v) for v in values)
    if vr == "DA":
        return all(not v.strip() or _is_date(v.strip()) for v in values)
    rule = _PATTERN_RULES.get(vr)
    if rule is None:
        return False
    max_length, pattern = rule
    for v in values:
        if max_length and len(v) > max_length:
            return False
        if pattern is not None and v and not pattern.match(v):
            return False
    return True


def undecodable(tag: int, exc: Exception) -> str:
    """The error of an element whose bytes pydicom cannot turn into a value (bad VR, bad length, bad encoding)."""
    return f"Dicom element '{keyword_of(tag)}' could not be decoded: {pydicom_error(exc)}"


def pydicom_error(exc: Exception) -> str:
    """An error of pydicom's as one short line: its messages may carry whole tracebacks (its writer puts one in per
    nesting level) and a link to the standard."""
    text = _PYDICOM_HINT.sub("", str(exc)).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def decoded_elements(ds) -> Iterator[tuple[int, DataElement | None, Exception | None]]:
    """(tag, element, None) for each element, or (tag, None, error) when its raw value cannot be decoded.

    Iterating a pydicom dataset decodes each raw element and stops at the first one that fails; a damaged element
    must fail (or be dropped) on its own, not take the whole instance down with an unexpected error.
    """
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except Exception as exc:
            yield int(tag), None, exc
            continue
        yield int(tag), elem, None


def dataset_errors(ds, trim_nul: bool, skip: frozenset[int] = frozenset()) -> dict[int, str]:
    """Top-level tag -> first error found in it or in any nested sequence item."""
    errors: dict[int, str] = {}
    for tag, elem, failure in decoded_elements(ds):
        if tag in skip or tag & 0xFFFF == 0:
            continue
        if elem is None:
            errors[tag] = undecodable(tag, failure)
            continue
        if elem.VR == "SQ":
            try:
                for item in elem.value:
                    nested = dataset_errors(item, trim_nul)
                    if nested:
                        errors[tag] = next(iter(nested.values()))
                        break
            except Exception as exc:
                errors[tag] = undecodable(tag, exc)
            continue
        try:
            message = element_error(elem, trim_nul)
        except Exception as exc:  # a value pydicom could not even decode
            message = undecodable(tag, exc)
        if message:
            errors[tag] = message
    return errors


__all__ = [
    "dataset_errors",
    "decoded_elements",
    "element_error",
    "error_comment",
    "invalid_character",
    "pydicom_error",
    "text_values_valid",
    "undecodable",
    "values_of",
]
