"""Plain values exchanged between the domain and the index."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Partition:
    key: int
    name: str
    created_at: datetime


@dataclass
class IndexValues:
    """Folded values of the indexed study and series attributes of one instance, and the words of its names."""

    study: dict[str, str | None] = field(default_factory=dict)
    series: dict[str, str | None] = field(default_factory=dict)
    patient_name_words: list[str] = field(default_factory=list)
    referring_physician_words: list[str] = field(default_factory=list)


@dataclass
class NewInstance:
    """Everything the index records when an instance's file has become durable."""

    partition_key: int
    watermark: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    file_size: int
    frame_count: int
    frames_json: str | None
    metadata_json: str
    values: IndexValues


@dataclass(frozen=True)
class PendingCreate:
    """A store that reserved its UIDs but has not committed (in flight, or left by a crash)."""

    partition_key: int
    study_uid: str
    series_uid: str
    sop_uid: str
    watermark: int


@dataclass(frozen=True)
class StoredInstance:
    watermark: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    file_size: int
    frame_count: int
    frames_json: str | None


@dataclass(frozen=True)
class ExtendedColumn:
    """Where an extended query tag's values are indexed: its key, level and kind (string, long or double)."""

    tag_key: int
    level: str
    kind: str


@dataclass(frozen=True)
class QueryFilter:
    """One QIDO condition on an indexed attribute; values are already folded the way the index stores them.

    ``match`` is ``exact``, ``wildcard`` (``*``/``?``), ``list`` (any of several UIDs), ``range`` (``low``/``high``,
    either may be empty) or ``fuzzy`` (every word of ``values`` prefixes some word of the name).
    """

    tag: int
    match: str
    values: tuple[str, ...] = ()
    low: str = ""
    high: str = ""
    extended: ExtendedColumn | None = None  # set for an extended query tag


@dataclass(frozen=True)
class QidoQuery:
    level: str  # "study" | "series" | "instance"
    partition_key: int
    filters: tuple[QueryFilter, ...]
    limit: int
    offset: int


@dataclass(frozen=True)
class QidoRow:
    study_key: int
    series_key: int | None
    watermark: int  # the instance whose metadata represents the row
    document: str  # that instance's DICOM JSON
    instance_count: int | None = None  # study and series rows: their created instances
    series_count: int | None = None  # study rows: their series
