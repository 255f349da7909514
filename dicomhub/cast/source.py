"""Where DICOMcast's entries come from: the local index (through the domain's change-feed service), or a remote
DICOMweb archive's ``/v1/changefeed`` and metadata routes (Azure's service included), over HTTP.

Both read in sequence order after a cursor. Each entry names the base URL of its partition, which becomes the
Endpoint address of its ImagingStudy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from dicomhub.cast.fhir import ClientCredentials, FhirError, RetryingClient
from dicomhub.config import DEFAULT_PARTITION
from dicomhub.domain.changefeed import ChangeFeedEntry, ChangeFeedService

PAGE_SIZE = 100
_VERSION_SUFFIX = re.compile(r"/v\d+(\.\d+)?(-prerelease)?$")


@dataclass(frozen=True)
class Entry:
    sequence: int
    action: str  # Create | Update | Delete
    state: str  # Current | Replaced | Deleted
    partition_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    timestamp: datetime
    metadata: dict | None


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    scanned_to: int  # every sequence up to here has been seen (gaps included)


@dataclass(frozen=True)
class Position:
    latest_sequence: int  # 0 for an empty feed
    next_timestamp: datetime | None  # of the first entry after the cursor


class Source(Protocol):
    def read(self, after: int, limit: int = PAGE_SIZE) -> Page: ...

    def position(self, after: int) -> Position: ...

    def partition_base(self, partition_name: str) -> str: ...


def versioned_base(url: str) -> str:
    """An archive's versioned base URL: ``/v2`` is added to a root URL."""
    url = url.rstrip("/")
    return url if _VERSION_SUFFIX.search(url) else f"{url}/v2"


def archive_root(url: str) -> str:
    return _VERSION_SUFFIX.sub("", url.rstrip("/"))


def _with_partition(base: str, partitioned: bool, name: str) -> str:
    return f"{base}/partitions/{name}" if partitioned else base


class LocalSource:
    """The change feed of the index this process shares with ``dicomhub serve``."""

    def __init__(self, feed: ChangeFeedService, public_base: str, partitions_enabled: bool) -> None:
        self.feed = feed
        self.public_base = public_base.rstrip("/")
        self.partitions_enabled = partitions_enabled

    def read(self, after: int, limit: int = PAGE_SIZE) -> Page:
        entries = [self._entry(e) for e in self.feed.following(after, limit, include_metadata=True)]
        return Page(entries, entries[-1].sequence if entries else after)

    def position(self, after: int) -> Position:
        latest = self.feed.latest(1, include_metadata=False)
        following = self.feed.following(after, 1, include_metadata=False)
        return Position(latest.sequence if latest else 0, following[0].timestamp if following else None)

    def partition_base(self, partition_name: str) -> str:
        return _with_partition(self.public_base, self.partitions_enabled, partition_name)

    @staticmethod
    def _entry(e: ChangeFeedEntry) -> Entry:
        metadata = json.loads(e.metadata_json) if e.metadata_json else None
        return Entry(
            e.sequence, e.action, e.state, e.partition_name, e.study_uid, e.series_uid, e.sop_uid, e.timestamp, metadata
        )


def _field(raw: dict, name: str):
    """Azure's change feed is camelCase, its documentation PascalCase: read either."""
    for key, value in raw.items():
        if key.lower() == name.lower():
            return value
    return None


class RemoteSource:
    """A DICOMweb archive's v1 change feed (sequence paging: ``offset`` is the sequence to start after)."""

    def __init__(self, url: str, public_base: str | None, auth: ClientCredentials | None, retry_seconds: float):
        self.root = archive_root(url)
        self.public_base = (public_base or versioned_base(url)).rstrip("/")
        self.client = RetryingClient(self.root, auth, retry_seconds)
        self._partitions_enabled: bool | None = None

    def _get(self, path: str, params: dict | None = None, allowed: tuple[int, ...] = (200,)):
        response = self.client.send("GET", path, params=params)
        if response.status_code not in allowed:
            raise FhirError(response.status_code, f"GET {self.root}/{path}: {response.text[:300]}")
        return response

    @property
    def partitions_enabled(self) -> bool:
        """An archive with partitions answers ``GET /v1/partitions`` with 200 (400 when the feature is off)."""
        if self._partitions_enabled is None:
            self._partitions_enabled = self._get("v1/partitions", allowed=(200, 204, 400, 404)).status_code in (
                200,
                204,
            )
        return self._partitions_enabled

    def read(self, after: int, limit: int = PAGE_SIZE) -> Page:
        raw = self._get("v1/changefeed", {"offset": after, "limit": limit, "includeMetadata": "true"}).json()
        entries = [self._entry(r) for r in raw]
        if entries:
            return Page(entries, entries[-1].sequence)
        # v1 reads the span (after, after + limit]: an empty span below the newest entry is a gap to step over
        latest = self.position(after).latest_sequence
        return Page([], min(after + limit, latest) if latest > after else after)

    def position(self, after: int) -> Position:
        response = self._get("v1/changefeed/latest", {"includeMetadata": "false"}, allowed=(200, 204))
        latest = int(_field(response.json(), "sequence")) if response.status_code == 200 else 0
        following = self._get("v1/changefeed", {"offset": after, "limit": 1, "includeMetadata": "false"}).json()
        return Position(latest, self._entry(following[0]).timestamp if following else None)

    def partition_base(self, partition_name: str) -> str:
        return _with_partition(self.public_base, self.partitions_enabled, partition_name)

    def _entry(self, raw: dict) -> Entry:
        stamp = datetime.fromisoformat(str(_field(raw, "timestamp")).replace("Z", "+00:00"))
        entry = Entry(
            int(_field(raw, "sequence")),
            str(_field(raw, "action")),
            str(_field(raw, "state")),
            str(_field(raw, "partitionName") or DEFAULT_PARTITION),
            str(_field(raw, "studyInstanceUid")),
            str(_field(raw, "seriesInstanceUid")),
            str(_field(raw, "sopInstanceUid")),
            stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC),
            _field(raw, "metadata"),
        )
        if entry.metadata is None and entry.action != "Delete" and entry.state != "Deleted":
            return self._with_metadata(entry)
        return entry

    def _with_metadata(self, entry: Entry) -> Entry:
        """An entry served without metadata: its instance's metadata route (gone by now: treated as deleted)."""
        scope = f"partitions/{entry.partition_name}/" if self.partitions_enabled else ""
        path = f"v1/{scope}studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}/metadata"
        response = self._get(path, allowed=(200, 404))
        if response.status_code == 404:
            return Entry(**{**entry.__dict__, "state": "Deleted"})
        return Entry(**{**entry.__dict__, "metadata": response.json()[0]})
