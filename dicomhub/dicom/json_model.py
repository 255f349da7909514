"""Datasets as DICOM JSON (PS3.18 Annex F) with bulk-data VRs left out, as Azure's metadata does.

:func:`dataset_model` is the store's single pass: it validates every element and builds its JSON from one decoding.
Elements in the common encodings (explicit VR little endian, printable ASCII text, whole numbers of binary values)
are decoded here straight from their bytes, with pydicom's rules for padding and multiple values; anything else, or
any value not certainly valid, goes through pydicom's conversion and :func:`element_error`, so messages and JSON are
those of :func:`dataset_errors` and :func:`dataset_to_json` (tests/test_json_model.py compares them).
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

import orjson
from pydicom import config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from dicomhub.dicom.validation import element_error, text_values_valid, undecodable

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NO_BULK_HANDLER_THRESHOLD = 2**62


def element_to_json(elem: DataElement) -> dict[str, Any]:
    """One element as DICOM JSON; raises when its value cannot be represented."""
    if elem.VR == "SQ":
        items = [dataset_to_json(item)[0] for item in elem.value]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    return elem.to_json_dict(None, _NO_BULK_HANDLER_THRESHOLD)


def dataset_to_json(ds: Dataset, skip: frozenset[int] = frozenset()) -> tuple[dict[str, Any], list[int]]:
    """Returns the JSON model and the tags whose values could not be converted (left out of the model).

    Each element is decoded on its own: one damaged element (unknown VR, wrong byte count, bad text) is left out
    instead of failing the whole model.
    """
    out: dict[str, Any] = {}
    unconvertible: list[int] = []
    for tag in list(ds.keys()):
        tag = int(tag)
        if tag in skip or tag & 0xFFFF == 0:
            continue
        raw_vr = getattr(ds.get_item(tag), "VR", None)
        if raw_vr in BULK_VRS:
            continue  # known from the raw element: no need to decode bulk data just to leave it out
        try:
            elem = ds[tag]
            if elem.VR in BULK_VRS:
                continue
            out[f"{tag:08X}"] = element_to_json(elem)
        except Exception:  # pydicom raises many kinds (ValueError, BytesLengthException, NotImplementedError, ...)
            unconvertible.append(tag)
    return out, unconvertible


def json_text(value: Any) -> str:
    """A model (or frame ranges) as stored: compact JSON, UTF-8 text unescaped. orjson writes it in a tenth of the
    standard library's time, but writes NaN and infinities as null where the standard library writes NaN/Infinity
    (which the re-index reads back and reports as not finite numbers), and refuses integers beyond 64 bits: what it
    writes with a null in it, or refuses, is written by the standard library, as before."""
    try:
        text = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, text that is not UTF-8
        text = None
    if text is None or b"null" in text:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.decode()


# -- the single pass -------------------------------------------------------------------------------------------------
SPECIFIC_CHARACTER_SET = 0x00080005
# Character sets in which printable ASCII bytes decode to themselves as pydicom decodes them (absent: its default)
_ASCII_CHARSETS = frozenset({b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"})
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_DS = re.compile(r"[+\-]?(\d+|\d+\.\d*|\.\d+)([eE][+\-]?\d+)?", re.ASCII)
_IS = re.compile(r"[+\-]?\d{1,15}", re.ASCII)  # beyond 15 digits pydicom may keep a float (ISfloat)
_NUMBERS = {"US": ("H", 2), "UL": ("L", 4), "SS": ("h", 2), "SL": ("l", 4), "FL": ("f", 4), "FD": ("d", 8)}
_FLOATS = frozenset({"FL", "FD"})
# Text VRs whose whole value is split at backslashes after trailing spaces and NULs are stripped (pydicom's
# multi_string); SH/LO strip each value instead, LT/ST are never split.
_SPLIT_AFTER_STRIP = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_STRIP_EACH = frozenset({"SH", "LO"})
_SINGLE = frozenset({"LT", "ST"})
_TEXT_VRS = _SPLIT_AFTER_STRIP | _STRIP_EACH | _SINGLE
# LUT descriptors: pydicom reads a negative first value as unsigned, whatever the VR; left to pydicom
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_Fast = tuple[dict[str, Any], bool]


def dataset_model(
    ds: Dataset, validate: bool, trim_nul: bool = True, unchecked: frozenset[int] = frozenset()
) -> tuple[dict[str, Any], dict[int, str], list[int]]:
    """(JSON model, top-level tag -> first error found in it or its items, tags that could not be converted).

    With ``validate`` this is ``dataset_errors(ds, trim_nul, skip=unchecked)`` and then ``dataset_to_json`` of the
    elements without errors, in one pass and one decoding per element; without it, ``dataset_to_json(ds)`` and no
    errors. ``unchecked`` tags are converted but not validated.
    """
    fast = _fast_possible()
    return _model(ds, validate, trim_nul, unchecked, fast and _ascii_charset(ds, True))


def _fast_possible() -> bool:
    """pydicom's conversion is the one :func:`_fast_element` mirrors only in its default configuration."""
    return not (
        config.settings.reading_validation_mode == config.RAISE  # pydicom's conversion would refuse invalid values
        or config.data_element_callback is not None
        or config.use_DS_numpy
        or config.use_IS_numpy
        or config.use_DS_decimal
        or config.datetime_conversion
    )


def _ascii_charset(ds: Dataset, inherited: bool) -> bool:
    """Whether text of this data set decodes as ASCII: its own Specific Character Set, else its parent's."""
    elem = ds.get_item(SPECIFIC_CHARACTER_SET)
    if elem is None:
        return inherited
    value = elem.value
    if isinstance(value, bytes):
        return value.rstrip(b"\0 ") in _ASCII_CHARSETS
    if isinstance(value, str):
        return value.encode("latin-1", "replace") in _ASCII_CHARSETS
    return False


def _model(
    ds: Dataset, validate: bool, trim_nul: bool, unchecked: frozenset[int], fast: bool
) -> tuple[dict[str, Any], dict[int, str], list[int]]:
    out: dict[str, Any] = {}
    errors: dict[int, str] = {}
    unconvertible: list[int] = []
    for key, held in list(ds.items()):
        tag = int(key)
        if tag & 0xFFFF == 0:
            continue
        check = validate and tag not in unchecked
        if fast:
            element = None
            if type(held) is RawDataElement:
                if held.value is not None and held.VR not in BULK_VRS:
                    element = _fast_element(tag, held)
            elif type(held) is DataElement:  # decoded already (the required attributes are checked first)
                element = _fast_decoded(held)
            if element is not None and (element[1] or not check):
                out[f"{tag:08X}"] = element[0]
                continue
        # without validation bulk data is left out by the VR as read, undecoded (pydicom's get_item decodes an
        # element without a value to answer, and may raise as dataset_to_json would)
        if not validate and getattr(ds.get_item(tag), "VR", None) in BULK_VRS:
            continue
        try:
            elem = ds[tag]
        except Exception as exc:
            if check:
                errors[tag] = undecodable(tag, exc)
            elif getattr(ds.get_item(tag), "VR", None) not in BULK_VRS:
                unconvertible.append(tag)
            continue
        if elem.VR in BULK_VRS:
            continue  # decoded only to be validated (bulk VRs have no value rules; undecodable bytes do)
        if elem.VR == "SQ":
            _sequence(tag, elem, check, trim_nul, fast, out, errors, unconvertible)
            continue
        if check:
            try:
                message = element_error(elem, trim_nul)
            except Exception as exc:  # a value pydicom could not even decode
                message = undecodable(tag, exc)
            if message:
                errors[tag] = message
                continue
        try:
            out[f"{tag:08X}"] = elem.to_json_dict(None, _NO_BULK_HANDLER_THRESHOLD)
        except Exception:
            unconvertible.append(tag)
    return out, errors, unconvertible


def _sequence(
    tag: int,
    elem: DataElement,
    check: bool,
    trim_nul: bool,
    fast: bool,
    out: dict[str, Any],
    errors: dict[int, str],
    unconvertible: list[int],
) -> None:
    """A sequence: its items' models, or (when checked) the first error found in them, which drops it whole."""
    items = []
    try:
        for item in elem.value:
            model, nested, _ = _model(item, check, trim_nul, frozenset(), fast and _ascii_charset(item, fast))
            if nested:
                errors[tag] = next(iter(nested.values()))
                return
            items.append(model)
    except Exception as exc:
        if check:
            errors[tag] = undecodable(tag, exc)
        else:
            unconvertible.append(tag)
        return
    out[f"{tag:08X}"] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def _fast_element(tag: int, raw: RawDataElement) -> _Fast | None:
    """(JSON, certainly valid) of a raw element decoded from its bytes as pydicom would, or None to leave it to
    pydicom (other encodings, non-ASCII or control characters, odd lengths, values pydicom parses specially)."""
    value = raw.value
    vr = raw.VR
    if vr is None or raw.is_implicit_VR or not raw.is_little_endian or value is None or raw.length == 0xFFFFFFFF:
        return None
    number = _NUMBERS.get(vr)
    if number is not None:
        return _fast_numbers(tag, vr, value, *number)
    stripped = value.rstrip(b"\0 ")
    if not _PRINTABLE.fullmatch(stripped):
        return None
    if vr in _SPLIT_AFTER_STRIP:
        if vr == "UI" and b" " in stripped:
            return None  # pydicom strips each UID's spaces on both sides
        values = stripped.decode("ascii").split("\\")
    elif vr in _STRIP_EACH:  # the bytes past ``stripped`` are NULs and spaces: ASCII too
        values = [v.rstrip("\0 ") for v in value.decode("ascii").split("\\")]
    elif vr in _SINGLE:
        values = [stripped.decode("ascii")]
    elif vr == "PN":
        return _fast_names(stripped.decode("ascii"))
    elif vr == "DS":
        return _fast_decimals(stripped)
    elif vr == "IS":
        return _fast_integers(stripped)
    else:
        return None
    if len(values) == 1:
        if not values[0]:
            return {"vr": vr}, True
    elif "" in values:
        return None  # empty values among several: rare, left to pydicom
    return {"vr": vr, "Value": values}, text_values_valid(vr, values)


def _fast_decoded(elem: DataElement) -> _Fast | None:
    """(JSON, certainly valid) of a single text value pydicom decoded already, when it is printable ASCII."""
    vr = elem.VR
    value = elem.value
    if vr not in _TEXT_VRS or not isinstance(value, str) or not (value.isascii() and value.isprintable()):
        return None
    if not value:
        return {"vr": vr}, True
    return {"vr": vr, "Value": [value]}, text_values_valid(vr, [value])


def _fast_numbers(tag: int, vr: str, value: bytes, code: str, size: int) -> _Fast | None:
    count, rest = divmod(len(value), size)
    if rest or tag in _LUT_DESCRIPTORS:
        return None
    if count == 0:
        return {"vr": vr}, True
    numbers = list(struct.unpack(f"<{count}{code}", value))
    if vr in _FLOATS and not all(math.isfinite(n) for n in numbers):
        return None
    return {"vr": vr, "Value": numbers}, True


def _fast_decimals(stripped: bytes) -> _Fast | None:
    items = stripped.decode("ascii").split("\\")
    if not items[0] and len(items) == 1:
        return {"vr": "DS"}, True
    numbers = []
    valid = True
    for item in items:
        if not _DS.fullmatch(item):
            return None
        number = float(item)
        if not math.isfinite(number):
            return None
        numbers.append(number)
        valid = valid and len(item) <= 16
    return {"vr": "DS", "Value": numbers}, valid


def _fast_integers(stripped: bytes) -> _Fast | None:
    items = stripped.decode("ascii").split("\\")
    if not items[0] and len(items) == 1:
        return {"vr": "IS"}, True
    numbers = []
    valid = True
    for item in items:
        if not _IS.fullmatch(item):
            return None
        numbers.append(int(item))
        valid = valid and len(item) <= 12
    return {"vr": "IS", "Value": numbers}, valid


def _fast_names(text: str) -> _Fast | None:
    if not text:
        return {"vr": "PN"}, True
    names = []
    for item in text.split("\\"):
        groups = item.split("=")
        while groups and not groups[-1]:
            groups.pop()
        if not groups or len(groups) > 3:
            return None
        name = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
        names.append(name)
    return {"vr": "PN", "Value": names}, True
