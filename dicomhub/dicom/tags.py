"""Tag and keyword lookups (PS3.6 data dictionary via pydicom)."""

from __future__ import annotations

import re

from pydicom.datadict import keyword_for_tag, tag_for_keyword

_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")


def parse_attribute_id(attribute_id: str) -> int | None:
    """An attribute id is 8 hex digits or a case-sensitive dictionary keyword; ``None`` when neither."""
    if _HEX_TAG.fullmatch(attribute_id):
        return int(attribute_id, 16)
    tag = tag_for_keyword(attribute_id)
    return int(tag) if tag is not None else None


def tag_key(tag: int) -> str:
    """The DICOM JSON key of a tag: 8 upper-case hex digits."""
    return f"{tag:08X}"


def keyword_of(tag: int) -> str:
    return keyword_for_tag(tag) or tag_key(tag)


def format_tag(tag: int) -> str:
    """``(gggg,eeee)`` in lower-case hex, as Azure's error comments write it."""
    return f"({tag >> 16:04x},{tag & 0xFFFF:04x})"
