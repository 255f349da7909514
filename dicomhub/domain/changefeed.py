"""The change feed: query parameters of both API versions, and entries with their state.

v1 pages by sequence (``offset`` is the sequence to start after, ``limit`` a span of sequences); v2 pages a time
window in (timestamp, sequence) order (``offset`` is a count of entries to skip). An entry's state compares its own
watermark with the instance's current one, which the index keeps on every entry of the instance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from dicomhub.domain.errors import InvalidRequest
from dicomhub.index.changefeed import EARLIEST, LATEST, MAX_SEQUENCE, ChangeFeedReader, ChangeRow
from dicomhub.index.repository import Index
from dicomhub.index.schema import CHANGE_CREATE, CHANGE_DELETE, CHANGE_UPDATE

ACTIONS = {CHANGE_CREATE: "Create", CHANGE_DELETE: "Delete", CHANGE_UPDATE: "Update"}
# (default, maximum) of ``limit`` per API version
LIMITS = {1: (10, 100), 2: (100, 200)}
_INTEGER = re.compile(r"[+-]?[0-9]+")
# a "+hh:mm" offset whose "+" arrived unencoded in the query string, and so was decoded as a space
_SPACED_OFFSET = re.compile(r"(T\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$")


@dataclass(frozen=True)
class FeedRequest:
    limit: int
    offset: int = 0
    include_metadata: bool = True
    start: datetime = EARLIEST
    end: datetime = LATEST


@dataclass(frozen=True)
class ChangeFeedEntry:
    sequence: int
    partition_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    action: str
    timestamp: datetime
    state: str
    metadata_json: str | None


def _invalid(name: str, detail: str) -> InvalidRequest:
    return InvalidRequest(f"The query parameter '{name}' is invalid. {detail}")


def _first_values(params: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Parameter names match case-insensitively; a repeated one counts with its first value."""
    values: dict[str, str] = {}
    for name, value in params:
        values.setdefault(name.lower(), value)
    return values


def _integer(name: str, value: str, low: int, high: int) -> int:
    text = value.strip()
    number = int(text) if _INTEGER.fullmatch(text) else None
    if number is None or not -MAX_SEQUENCE - 1 <= number <= MAX_SEQUENCE:
        raise _invalid(name, f"The value '{value}' is not valid.")
    if not low <= number <= high:
        raise _invalid(name, f"The field {name} must be between {low} and {high}.")
    return number


def _boolean(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise _invalid(name, f"The value '{value}' is not valid.")
    return text == "true"


def _moment(name: str, value: str) -> datetime:
    """An ISO 8601 date and time that names its offset from UTC, in UTC (clamped to the representable range)."""
    text = _SPACED_OFFSET.sub(r"\1+\2", value.strip())
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid(name, f"The value '{value}' is not valid.") from None
    if moment.tzinfo is None:
        raise _invalid(name, "Date and time value must specify a time zone.")
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00
        return LATEST if moment.year > 1 else EARLIEST


def include_metadata_of(params: Sequence[tuple[str, str]]) -> bool:
    value = _first_values(params).get("includemetadata")
    return True if value is None else _boolean("includeMetadata", value)


def parse_feed(params: Sequence[tuple[str, str]], api_version: int) -> FeedRequest:
    """The paging parameters of ``GET /changefeed``; raises InvalidRequest with the parameter's name."""
    values = _first_values(params)
    default_limit, max_limit = LIMITS[api_version]
    limit = _integer("limit", values["limit"], 1, max_limit) if "limit" in values else default_limit
    offset = _integer("offset", values["offset"], 0, MAX_SEQUENCE) if "offset" in values else 0
    include = include_metadata_of(params)
    if api_version == 1:
        return FeedRequest(limit, offset, include)
    start = _moment("startTime", values["starttime"]) if "starttime" in values else EARLIEST
    end = _moment("endTime", values["endtime"]) if "endtime" in values else LATEST
    if start >= end:
        raise InvalidRequest(
            f"The start time '{start.isoformat()}' must occur strictly before the end time '{end.isoformat()}'."
        )
    return FeedRequest(limit, offset, include, start, end)


def _state(row: ChangeRow) -> str:
    if row.current_watermark is None:
        return "Deleted"
    return "Current" if row.current_watermark == row.original_watermark else "Replaced"


def _entry(row: ChangeRow) -> ChangeFeedEntry:
    return ChangeFeedEntry(
        row.sequence,
        row.partition_name,
        row.study_uid,
        row.series_uid,
        row.sop_uid,
        ACTIONS[row.action],
        row.timestamp,
        _state(row),
        row.metadata_json,
    )


class ChangeFeedService:
    """Reads of the cross-partition feed."""

    def __init__(self, index: Index) -> None:
        self.reader = ChangeFeedReader(index)

    def read(self, request: FeedRequest, api_version: int) -> list[ChangeFeedEntry]:
        if api_version == 1:
            rows = self.reader.by_sequence(request.offset, request.limit, request.include_metadata)
        else:
            rows = self.reader.by_time(
                request.start, request.end, request.offset, request.limit, request.include_metadata
            )
        return [_entry(r) for r in rows]

    def following(self, after: int, limit: int, include_metadata: bool) -> list[ChangeFeedEntry]:
        """The next ``limit`` entries after sequence ``after``, in sequence order (a follower's read: DICOMcast)."""
        return [_entry(r) for r in self.reader.following(after, limit, include_metadata)]

    def latest(self, api_version: int, include_metadata: bool) -> ChangeFeedEntry | None:
        """The newest entry: highest sequence (v1) or highest (timestamp, sequence) (v2); None for an empty feed."""
        row = self.reader.latest(by_time=api_version >= 2, with_metadata=include_metadata)
        return _entry(row) if row else None
