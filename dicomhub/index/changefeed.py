"""The change feed in the index: appending entries (inside the transaction of the change) and reading pages.

Ordering guarantee: a reader that pages by sequence (or by (timestamp, sequence)) never skips an entry that commits
later. On PostgreSQL sequence values are handed out at insert time while transactions commit in any order, so a
reader could see N+1 before N commits. Appends therefore take a transaction-scoped advisory lock right before they
insert and hold it to commit: appenders go one at a time, so sequences become visible in increasing order, and the
timestamp, also taken under the lock and never lower than the newest one, grows with the sequence. SQLite writers
are serialised by ``BEGIN IMMEDIATE`` already. Appending must be the last statement of its transaction, so the lock
is held only for the insert and the commit, and no one waits for another lock while holding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Select, bindparam, func, insert, select, text, update

from dicomhub.index.schema import change_feed, instance_metadata, partition

if TYPE_CHECKING:
    from dicomhub.index.repository import Index

# pg_advisory_xact_lock key of change-feed appends (any constant unlikely to collide: "dicomhub" in ASCII)
APPEND_LOCK_KEY = 0x6469636F6D687562
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
MAX_SEQUENCE = 2**63 - 1


@dataclass(frozen=True)
class Change:
    """One entry to append. ``watermark`` is the version the entry is about; ``current_watermark`` is the
    instance's version once the change is made (``None`` when it was deleted): every earlier entry of the same
    instance takes it as well, which is what makes them ``Replaced`` or ``Deleted``."""

    action: int
    partition_key: int
    study_uid: str
    series_uid: str
    sop_uid: str
    watermark: int
    current_watermark: int | None


@dataclass(frozen=True)
class ChangeRow:
    sequence: int
    timestamp: datetime
    action: int
    partition_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    original_watermark: int
    current_watermark: int | None
    metadata_json: str | None


_same_instance = (
    (change_feed.c.partition_key == bindparam("b_partition"))
    & (change_feed.c.study_uid == bindparam("b_study"))
    & (change_feed.c.series_uid == bindparam("b_series"))
    & (change_feed.c.sop_uid == bindparam("b_sop"))
)
_SET_CURRENT = update(change_feed).where(_same_instance).values(current_watermark=bindparam("b_current"))
_NEWEST_TIMESTAMP = select(func.max(change_feed.c.timestamp))


def append_changes(conn: Connection, changes: Sequence[Change]) -> None:
    """Appends entries and moves the current watermark of the instances' earlier entries; the caller's transaction
    must end right after (see the module docstring)."""
    if not changes:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPEND_LOCK_KEY})
    newest = conn.execute(_NEWEST_TIMESTAMP).scalar()
    now = datetime.now(UTC)
    if newest is not None:
        now = max(now, newest)  # a clock stepping back must not put entries before older ones
    conn.execute(
        _SET_CURRENT,
        [
            {
                "b_partition": c.partition_key,
                "b_study": c.study_uid,
                "b_series": c.series_uid,
                "b_sop": c.sop_uid,
                "b_current": c.current_watermark,
            }
            for c in changes
        ],
    )
    conn.execute(
        insert(change_feed),
        [
            {
                "timestamp": now,
                "action": c.action,
                "partition_key": c.partition_key,
                "study_uid": c.study_uid,
                "series_uid": c.series_uid,
                "sop_uid": c.sop_uid,
                "original_watermark": c.watermark,
                "current_watermark": c.current_watermark,
            }
            for c in changes
        ],
    )


def _select(with_metadata: bool) -> Select:
    columns = [
        change_feed.c.sequence,
        change_feed.c.timestamp,
        change_feed.c.action,
        partition.c.name,
        change_feed.c.study_uid,
        change_feed.c.series_uid,
        change_feed.c.sop_uid,
        change_feed.c.original_watermark,
        change_feed.c.current_watermark,
    ]
    joined = change_feed.join(partition, partition.c.partition_key == change_feed.c.partition_key)
    if with_metadata:
        columns.append(instance_metadata.c.json)
        joined = joined.outerjoin(instance_metadata, instance_metadata.c.watermark == change_feed.c.current_watermark)
    return select(*columns).select_from(joined)


_BY_TIME_ORDER = (change_feed.c.timestamp, change_feed.c.sequence)
_BY_SEQUENCE = {
    m: _select(m)
    .where((change_feed.c.sequence > bindparam("b_after")) & (change_feed.c.sequence <= bindparam("b_upto")))
    .order_by(change_feed.c.sequence)
    for m in (False, True)
}
_IN_WINDOW = (change_feed.c.timestamp >= bindparam("b_start")) & (change_feed.c.timestamp < bindparam("b_end"))
# The entry ``skip`` places into the window, found on the (timestamp, sequence) index alone: skipping rows there costs
# far less than skipping full rows, and the page itself then starts from that key.
_FIRST_OF_PAGE = (
    select(change_feed.c.timestamp, change_feed.c.sequence)
    .where(_IN_WINDOW)
    .order_by(*_BY_TIME_ORDER)
    .limit(1)
    .offset(bindparam("b_skip"))
)
_BY_TIME = {
    m: _select(m)
    .where(
        (change_feed.c.timestamp >= bindparam("b_first_time"))  # the range the index scan starts from
        & (change_feed.c.timestamp < bindparam("b_end"))
        & ((change_feed.c.timestamp > bindparam("b_first_time")) | (change_feed.c.sequence >= bindparam("b_first")))
    )
    .order_by(*_BY_TIME_ORDER)
    .limit(bindparam("b_limit"))
    for m in (False, True)
}
_AFTER_SEQUENCE = {
    m: _select(m)
    .where(change_feed.c.sequence > bindparam("b_after"))
    .order_by(change_feed.c.sequence)
    .limit(bindparam("b_limit"))
    for m in (False, True)
}
_LATEST_BY_SEQUENCE = {m: _select(m).order_by(change_feed.c.sequence.desc()).limit(1) for m in (False, True)}
_LATEST_BY_TIME = {m: _select(m).order_by(*(c.desc() for c in _BY_TIME_ORDER)).limit(1) for m in (False, True)}


class ChangeFeedReader:
    """Pages of the feed; each reads the sequence primary key or the (timestamp, sequence) index in order."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def by_sequence(self, after: int, limit: int, with_metadata: bool) -> list[ChangeRow]:
        """Entries with ``after < sequence <= after + limit``."""
        params = {"b_after": after, "b_upto": min(after + limit, MAX_SEQUENCE)}
        return self._rows(_BY_SEQUENCE[with_metadata], params, with_metadata)

    def following(self, after: int, limit: int, with_metadata: bool) -> list[ChangeRow]:
        """The first ``limit`` entries with ``sequence > after`` (gaps left by rolled-back appends do not matter)."""
        return self._rows(_AFTER_SEQUENCE[with_metadata], {"b_after": after, "b_limit": limit}, with_metadata)

    def by_time(self, start: datetime, end: datetime, skip: int, limit: int, with_metadata: bool) -> list[ChangeRow]:
        """Entries with ``start <= timestamp < end`` in (timestamp, sequence) order, the first ``skip`` left out."""
        with self.index.read() as conn:
            first = conn.execute(_FIRST_OF_PAGE, {"b_start": start, "b_end": end, "b_skip": skip}).first()
        if first is None:
            return []
        params = {"b_end": end, "b_first_time": first.timestamp, "b_first": first.sequence, "b_limit": limit}
        return self._rows(_BY_TIME[with_metadata], params, with_metadata)

    def latest(self, by_time: bool, with_metadata: bool) -> ChangeRow | None:
        rows = self._rows((_LATEST_BY_TIME if by_time else _LATEST_BY_SEQUENCE)[with_metadata], {}, with_metadata)
        return rows[0] if rows else None

    def _rows(self, statement: Select, params: dict, with_metadata: bool) -> list[ChangeRow]:
        with self.index.read() as conn:
            rows = conn.execute(statement, params).all()
        return [
            ChangeRow(
                r.sequence,
                r.timestamp,
                r.action,
                r.name,
                r.study_uid,
                r.series_uid,
                r.sop_uid,
                r.original_watermark,
                r.current_watermark,
                r.json if with_metadata else None,
            )
            for r in rows
        ]
