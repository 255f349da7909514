"""UID rules shared by dataset validation and URL path parsing."""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9.]*[0-9]")

INVALID_UID_MESSAGE = (
    "DICOM Identifier is invalid. Value length should not exceed the maximum length of 64 characters. "
    "Value should contain characters in '0'-'9' and '.'. Each component must start with non-zero number."
)


def normalize_uid(value: str) -> str:
    """Trailing spaces and NULs are padding, not part of the identifier."""
    return value.rstrip(" \0")


def is_valid_uid(value: str) -> bool:
    value = normalize_uid(value)
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None
