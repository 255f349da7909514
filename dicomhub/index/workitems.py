"""Worklist rows in SQL: workitems with their search values, subscriptions, and the events not yet delivered.

Every change of a workitem is one transaction that checks and increments the row's version (a write based on a
stale read changes nothing and reports the conflict) and writes the events of the change for each subscriber of the
workitem. Creating a workitem and a global subscription exclude each other on PostgreSQL (advisory lock, shared for
creates), so a new workitem is either seen by the subscription's scan of existing workitems or subscribed at create.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, Engine, and_, delete, insert, literal, select, text, true
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from dicomhub.index.engine import read_transaction, utc_now, write_transaction
from dicomhub.index.qido import like_pattern, value_condition
from dicomhub.index.records import QueryFilter
from dicomhub.index.schema import workitem, workitem_event, workitem_subscription, workitem_value

# columns of the workitem row that searches filter on, by name
COLUMNS = {
    "state": workitem.c.state,
    "patient_name": workitem.c.patient_name,
    "patient_id": workitem.c.patient_id,
    "scheduled_start": workitem.c.scheduled_start,
    "study_uid": workitem.c.study_uid,
}
# attributes with any number of values (sequence paths, name words): workitem_value.attribute codes
VALUE_ATTRIBUTES = {
    "accession_number": 1,
    "requested_procedure_id": 2,
    "station_name": 3,
    "station_class": 4,
    "station_location": 5,
    "patient_name_word": 6,
}
_SUBSCRIPTION_LOCK = 0x55505353  # "UPSS": global subscriptions against creates (PostgreSQL advisory lock)


@dataclass(frozen=True)
class WorkitemFilter:
    """A search condition on one stored attribute: a COLUMNS name or a VALUE_ATTRIBUTES name."""

    key: str
    condition: QueryFilter


@dataclass
class WorkitemValues:
    """The folded search values of a workitem: its columns, and (attribute name, value) pairs of the value table."""

    columns: dict[str, str | None] = field(default_factory=dict)
    values: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class WorkitemRow:
    key: int
    uid: str
    state: str
    transaction_uid: str | None
    version: int
    json: str


@dataclass(frozen=True)
class Subscription:
    aet: str
    workitem_uid: str
    deletion_lock: bool
    suspended: bool


@dataclass(frozen=True)
class Event:
    key: int
    payload: str


class WorkitemExists(Exception):
    pass


# An event payload for one workitem: called inside the transaction with the workitem's UID and stored JSON.
EventFor = Callable[[str, str], str]


def filters_to_json(filters: Sequence[WorkitemFilter]) -> str:
    return json.dumps([{"key": f.key, **asdict(f.condition)} for f in filters])


def filters_from_json(text_: str) -> list[WorkitemFilter]:
    return [
        WorkitemFilter(f["key"], QueryFilter(f["tag"], f["match"], tuple(f["values"]), f["low"], f["high"]))
        for f in json.loads(text_)
    ]


def _condition(flt: WorkitemFilter) -> ColumnElement[bool]:
    condition = flt.condition
    if condition.match == "universal":
        return true()
    if flt.key in COLUMNS:
        if condition.match == "fuzzy":  # every query word prefixes a word of the name
            word = VALUE_ATTRIBUTES["patient_name_word"]
            return and_(
                *(
                    _has_value(word, workitem_value.c.value.like(like_pattern(w) + "%", escape="\\"))
                    for w in condition.values
                )
            )
        return value_condition(COLUMNS[flt.key], condition)
    return _has_value(VALUE_ATTRIBUTES[flt.key], value_condition(workitem_value.c.value, condition))


def _has_value(attribute: int, matches: ColumnElement[bool]) -> ColumnElement[bool]:
    """``key IN (keys with a matching value)``: planners start from the (attribute, value) index, where a correlated
    EXISTS made SQLite test it row by row."""
    keys = select(workitem_value.c.workitem_key).where((workitem_value.c.attribute == attribute) & matches)
    return workitem.c.workitem_key.in_(keys)


class WorkitemStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def _write(self) -> AbstractContextManager[Connection]:
        return write_transaction(self.engine)

    def _read(self) -> AbstractContextManager[Connection]:
        return read_transaction(self.engine)

    def _lock_subscriptions(self, conn: Connection, shared: bool) -> None:
        if self.dialect == "postgresql":
            function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            conn.execute(text(f"SELECT {function}(:id)"), {"id": _SUBSCRIPTION_LOCK})

    # -- workitems ----------------------------------------------------------------------------------------------------
    def create(
        self, partition_key: int, uid: str, state: str, document: str, values: WorkitemValues, event_for: EventFor
    ) -> None:
        """Inserts the workitem, subscribes the global subscribers it matches and writes their initial State
        Reports; raises WorkitemExists."""
        now = utc_now()
        try:
            with self._write() as conn:
                self._lock_subscriptions(conn, shared=True)
                key = conn.execute(
                    insert(workitem)
                    .values(
                        partition_key=partition_key,
                        sop_uid=uid,
                        transaction_uid=None,
                        version=1,
                        created_at=now,
                        updated_at=now,
                        json=document,
                        **(values.columns | {"state": state}),
                    )
                    .returning(workitem.c.workitem_key)
                ).scalar_one()
                self._write_values(conn, key, values)
                self._subscribe_globals(conn, partition_key, key, uid, now)
                self._notify(conn, partition_key, uid, event_for(uid, document), now)
        except IntegrityError:
            raise WorkitemExists() from None

    def _write_values(self, conn: Connection, key: int, values: WorkitemValues) -> None:
        rows = [{"workitem_key": key, "attribute": VALUE_ATTRIBUTES[a], "value": v} for a, v in set(values.values)]
        if rows:
            conn.execute(insert(workitem_value), rows)

    def _subscribe_globals(self, conn: Connection, partition_key: int, key: int, uid: str, now: datetime) -> None:
        """The active global subscribers become subscribers of the new workitem (filtered ones when it matches)."""
        subscriptions = conn.execute(
            select(workitem_subscription.c.aet, workitem_subscription.c.filters).where(
                (workitem_subscription.c.partition_key == partition_key)
                & workitem_subscription.c.filters.is_not(None)
                & (workitem_subscription.c.suspended == 0)
            )
        ).all()
        for aet, filters in subscriptions:
            conditions = [_condition(f) for f in filters_from_json(filters)]
            if (
                conditions
                and conn.execute(select(literal(1)).where((workitem.c.workitem_key == key), *conditions)).first()
                is None
            ):
                continue
            conn.execute(
                insert(workitem_subscription).values(
                    partition_key=partition_key,
                    aet=aet,
                    workitem_uid=uid,
                    deletion_lock=0,
                    suspended=0,
                    filters=None,
                    created_at=now,
                )
            )

    def get(self, partition_key: int, uid: str) -> WorkitemRow | None:
        with self._read() as conn:
            return self._get(conn, partition_key, uid)

    @staticmethod
    def _get(conn: Connection, partition_key: int, uid: str) -> WorkitemRow | None:
        row = conn.execute(
            select(
                workitem.c.workitem_key,
                workitem.c.sop_uid,
                workitem.c.state,
                workitem.c.transaction_uid,
                workitem.c.version,
                workitem.c.json,
            ).where((workitem.c.partition_key == partition_key) & (workitem.c.sop_uid == uid))
        ).first()
        return WorkitemRow(*row) if row else None

    def save(
        self,
        partition_key: int,
        read: WorkitemRow,
        state: str,
        transaction_uid: str | None,
        document: str,
        values: WorkitemValues,
        event: str | None,
    ) -> bool:
        """Writes a new version of ``read`` if it is still the stored one (False otherwise: nothing changed), with
        ``event`` for every subscriber of the workitem."""
        now = utc_now()
        with self._write() as conn:
            changed = conn.execute(
                sql_update(workitem)
                .where((workitem.c.workitem_key == read.key) & (workitem.c.version == read.version))
                .values(
                    transaction_uid=transaction_uid,
                    version=read.version + 1,
                    updated_at=now,
                    json=document,
                    **(values.columns | {"state": state}),
                )
            ).rowcount
            if not changed:
                return False
            conn.execute(delete(workitem_value).where(workitem_value.c.workitem_key == read.key))
            self._write_values(conn, read.key, values)
            if event is not None:
                self._notify(conn, partition_key, read.uid, event, now)
        return True

    def notify(self, partition_key: int, uid: str, event: str) -> int:
        """Writes ``event`` for every subscriber of the workitem; the number of subscribers."""
        with self._write() as conn:
            return self._notify(conn, partition_key, uid, event, utc_now())

    @staticmethod
    def _notify(conn: Connection, partition_key: int, uid: str, payload: str, now: datetime) -> int:
        recipients = select(
            workitem_subscription.c.partition_key,
            workitem_subscription.c.aet,
            literal(now, workitem_event.c.created_at.type),
            literal(payload, workitem_event.c.payload.type),
        ).where(
            (workitem_subscription.c.partition_key == partition_key) & (workitem_subscription.c.workitem_uid == uid)
        )
        return conn.execute(
            insert(workitem_event).from_select(["partition_key", "aet", "created_at", "payload"], recipients)
        ).rowcount

    def search(
        self, partition_key: int, filters: Sequence[WorkitemFilter], limit: int, offset: int
    ) -> list[tuple[str, str]]:
        """(UID, stored JSON) of one page of matches, oldest first: row and dataset read in one statement, so a page
        holds whole rows whatever changes meanwhile, and creation order keeps pages stable."""
        stmt = (
            select(workitem.c.sop_uid, workitem.c.json)
            .where(workitem.c.partition_key == partition_key, *(_condition(f) for f in filters))
            .order_by(workitem.c.workitem_key)
            .limit(limit)
            .offset(offset)
        )
        with self._read() as conn:
            return [(r[0], r[1]) for r in conn.execute(stmt).all()]

    # -- subscriptions ------------------------------------------------------------------------------------------------
    def subscribe(self, partition_key: int, aet: str, uid: str, deletion_lock: bool, event_for: EventFor) -> bool:
        """Subscribes ``aet`` to one workitem and queues its initial State Report; False when it does not exist."""
        now = utc_now()
        with self._write() as conn:
            found = self._get(conn, partition_key, uid)
            if found is None:
                return False
            self._upsert_subscription(conn, partition_key, aet, uid, deletion_lock, None, now)
            self._queue(conn, partition_key, aet, event_for(uid, found.json), now)
        return True

    def subscribe_global(
        self,
        partition_key: int,
        aet: str,
        global_uid: str,
        deletion_lock: bool,
        filters: Sequence[WorkitemFilter],
        event_for: EventFor,
    ) -> None:
        """A global subscription (filtered when ``filters``): ``aet`` is subscribed to every existing workitem it
        matches, which each get an initial State Report, and to every matching one created from now on."""
        now = utc_now()
        with self._write() as conn:
            self._lock_subscriptions(conn, shared=False)
            self._upsert_subscription(
                conn, partition_key, aet, global_uid, deletion_lock, filters_to_json(filters), now
            )
            existing = conn.execute(
                select(workitem.c.sop_uid, workitem.c.json)
                .where(workitem.c.partition_key == partition_key, *(_condition(f) for f in filters))
                .order_by(workitem.c.workitem_key)
            )
            for uid, document in existing.all():
                self._upsert_subscription(conn, partition_key, aet, uid, deletion_lock, None, now)
                self._queue(conn, partition_key, aet, event_for(uid, document), now)

    @staticmethod
    def _upsert_subscription(
        conn: Connection,
        partition_key: int,
        aet: str,
        uid: str,
        deletion_lock: bool,
        filters: str | None,
        now: datetime,
    ) -> None:
        key = (
            (workitem_subscription.c.partition_key == partition_key)
            & (workitem_subscription.c.aet == aet)
            & (workitem_subscription.c.workitem_uid == uid)
        )
        values = {"deletion_lock": int(deletion_lock), "suspended": 0, "filters": filters}
        if not conn.execute(sql_update(workitem_subscription).where(key).values(**values)).rowcount:
            conn.execute(
                insert(workitem_subscription).values(
                    partition_key=partition_key, aet=aet, workitem_uid=uid, created_at=now, **values
                )
            )

    @staticmethod
    def _queue(conn: Connection, partition_key: int, aet: str, payload: str, now: datetime) -> None:
        conn.execute(
            insert(workitem_event).values(partition_key=partition_key, aet=aet, created_at=now, payload=payload)
        )

    def unsubscribe(self, partition_key: int, aet: str, uid: str) -> None:
        with self._write() as conn:
            conn.execute(
                delete(workitem_subscription).where(
                    (workitem_subscription.c.partition_key == partition_key)
                    & (workitem_subscription.c.aet == aet)
                    & (workitem_subscription.c.workitem_uid == uid)
                )
            )

    def unsubscribe_all(self, partition_key: int, aet: str) -> None:
        """Global unsubscription: every subscription of ``aet``, global and per workitem, ends."""
        with self._write() as conn:
            conn.execute(
                delete(workitem_subscription).where(
                    (workitem_subscription.c.partition_key == partition_key) & (workitem_subscription.c.aet == aet)
                )
            )

    def suspend(self, partition_key: int, aet: str, global_uid: str) -> bool:
        """Stops new automatic subscriptions of a global subscription; False when ``aet`` has none."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    sql_update(workitem_subscription)
                    .where(
                        (workitem_subscription.c.partition_key == partition_key)
                        & (workitem_subscription.c.aet == aet)
                        & (workitem_subscription.c.workitem_uid == global_uid)
                    )
                    .values(suspended=1)
                ).rowcount
            )

    def subscriptions_of(self, partition_key: int, uid: str) -> list[Subscription]:
        with self._read() as conn:
            rows = conn.execute(
                select(
                    workitem_subscription.c.aet,
                    workitem_subscription.c.workitem_uid,
                    workitem_subscription.c.deletion_lock,
                    workitem_subscription.c.suspended,
                ).where(
                    (workitem_subscription.c.partition_key == partition_key)
                    & (workitem_subscription.c.workitem_uid == uid)
                )
            ).all()
        return [Subscription(r[0], r[1], bool(r[2]), bool(r[3])) for r in rows]

    # -- events -------------------------------------------------------------------------------------------------------
    def pending_events(self, partition_key: int, aet: str, limit: int) -> list[Event]:
        """The oldest undelivered events of ``aet``, in the order they were written."""
        with self._read() as conn:
            rows = conn.execute(
                select(workitem_event.c.event_key, workitem_event.c.payload)
                .where((workitem_event.c.partition_key == partition_key) & (workitem_event.c.aet == aet))
                .order_by(workitem_event.c.event_key)
                .limit(limit)
            ).all()
        return [Event(r[0], r[1]) for r in rows]

    def delivered(self, keys: Sequence[int]) -> None:
        if keys:
            with self._write() as conn:
                conn.execute(delete(workitem_event).where(workitem_event.c.event_key.in_(list(keys))))
