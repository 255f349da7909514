"""Extended query tags in the index: the tags, their values and their indexing errors.

Values are written by stores (in the store's commit transaction), by the re-index operation and by bulk update,
always through :func:`write_instance_values`, which is idempotent and keeps the value of the newest instance for
study- and series-level tags. Adding or deleting a tag and reading the tag list for indexing are serialized on
PostgreSQL by an advisory lock (shared for readers), so a store either sees a new tag or commits before the tag
exists (and is then covered by the re-index, which starts after the tag is committed).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

from sqlalchemy import Connection, Engine, Table, bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from dicomhub.index.engine import Prepared, in_lists, read_transaction, write_transaction
from dicomhub.index.schema import (
    EXTENDED_ADDING,
    EXTENDED_READY,
    INSTANCE_CREATED,
    extended_double,
    extended_long,
    extended_name_word,
    extended_query_tag,
    extended_query_tag_error,
    extended_string,
    instance,
    instance_metadata,
    partition,
    series,
    study,
)

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LONG_VRS = frozenset({"IS", "SL", "SS", "UL", "US"})
DOUBLE_VRS = frozenset({"FL", "FD"})
VALUE_TABLES: dict[str, Table] = {"string": extended_string, "long": extended_long, "double": extended_double}
_LOCK_ID = 0x45515447  # "EQTG": the advisory lock of the tag list (PostgreSQL)
_LOCK_FUNCTIONS = {True: "pg_advisory_xact_lock_shared", False: "pg_advisory_xact_lock"}


def kind_of(vr: str) -> str:
    """The value table of a VR: ``long``, ``double`` or ``string``."""
    return "long" if vr in LONG_VRS else "double" if vr in DOUBLE_VRS else "string"


@dataclass(frozen=True)
class ExtendedTag:
    key: int
    path: str  # 8 upper-case hex digits
    vr: str
    private_creator: str | None
    level: str
    status: int
    query_enabled: bool
    operation_id: str | None
    error_count: int = 0

    @property
    def tag(self) -> int:
        return int(self.path, 16)

    @property
    def kind(self) -> str:
        return kind_of(self.vr)


@dataclass(frozen=True)
class ExtendedValue:
    """One indexed value of an instance: folded text, an integer or a real; ``words`` of a person name."""

    tag_key: int
    level: str
    vr: str
    value: str | int | float
    words: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return kind_of(self.vr)


@dataclass(frozen=True)
class NewTag:
    path: str
    vr: str
    private_creator: str | None
    level: str


@dataclass(frozen=True)
class TagError:
    study_uid: str
    series_uid: str
    sop_uid: str
    created_at: datetime
    message: str
    partition_name: str


@dataclass(frozen=True)
class ReindexRow:
    """A created instance as the re-index reads it: its keys, UIDs and stored DICOM JSON."""

    instance_key: int
    partition_key: int
    study_key: int
    series_key: int
    watermark: int
    study_uid: str
    series_uid: str
    sop_uid: str
    json: str


class TagsExist(Exception):
    def __init__(self, paths: list[str]) -> None:
        super().__init__(", ".join(paths))
        self.paths = paths


class TooManyTags(Exception):
    pass


_LOCKS = {shared: Prepared(text(f"SELECT {f}(:id)")) for shared, f in _LOCK_FUNCTIONS.items()}


def _lock(conn: Connection, shared: bool) -> None:
    if conn.dialect.name == "postgresql":
        _LOCKS[shared].rows(conn, {"id": _LOCK_ID})


def _tags_query():
    """The tags with their error counts (a count per tag on the error table's primary key)."""
    errors = (
        select(func.count()).where(extended_query_tag_error.c.tag_key == extended_query_tag.c.tag_key).scalar_subquery()
    )
    return select(extended_query_tag, errors.label("error_count"))


_GET = _tags_query().where(extended_query_tag.c.path == bindparam("b_path"))  # built once: every QIDO on a tag


def _tag(row) -> ExtendedTag:
    return ExtendedTag(
        key=row.tag_key,
        path=row.path,
        vr=row.vr,
        private_creator=row.private_creator,
        level=row.level,
        status=row.status,
        query_enabled=bool(row.query_enabled),
        operation_id=row.operation_id,
        error_count=getattr(row, "error_count", 0),
    )


# -- the interface of stores and bulk update (inside their own transactions) ---------------------------------------
_INDEXING_COLUMNS = ("tag_key", "path", "vr", "private_creator", "level", "status", "query_enabled", "operation_id")
_IndexingRow = namedtuple("_IndexingRow", _INDEXING_COLUMNS)  # noqa: PYI024 - a row's shape for _tag
_INDEXING = Prepared(  # every store runs it: compiled once (an IN list would be expanded, and compiled, per call)
    select(*(extended_query_tag.c[name] for name in _INDEXING_COLUMNS)).where(
        (extended_query_tag.c.status == EXTENDED_ADDING) | (extended_query_tag.c.status == EXTENDED_READY)
    )
)


def indexing_tags(conn: Connection) -> list[ExtendedTag]:
    """The tags new values must be indexed for (being added or ready); one small query, under the shared lock.

    Read in the caller's transaction every time rather than cached: knowing a cached list is still current would
    take a read of its own (a version row) under the same lock, and costs what this one does (a few µs)."""
    _lock(conn, shared=True)
    return [_tag(_IndexingRow(*row)) for row in _INDEXING.rows(conn)]


@cache
def _statements(dialect: str, kind: str):
    """The upsert of a value (newest instance wins; returns a row only when it wrote) and the word statements."""
    table = VALUE_TABLES[kind]
    insert_of = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_of(table)
    upsert = stmt.on_conflict_do_update(
        index_elements=["tag_key", "resource_key"],
        set_={"value": stmt.excluded.value, "watermark": stmt.excluded.watermark},
        where=table.c.watermark <= stmt.excluded.watermark,
    ).returning(table.c.resource_key)
    forget_words = delete(extended_name_word).where(
        (extended_name_word.c.tag_key == bindparam("b_tag")) & (extended_name_word.c.resource_key == bindparam("b_key"))
    )
    return upsert, forget_words


def write_instance_values(
    conn: Connection,
    partition_key: int,
    study_key: int,
    series_key: int,
    instance_key: int,
    watermark: int,
    values: list[ExtendedValue],
) -> None:
    """Replaces the values of these tags for the instance (instance level), its series or its study (the newest
    instance's value wins there); idempotent, so a re-run task or a repeated update changes nothing."""
    keys = {STUDY: study_key, SERIES: series_key, INSTANCE: instance_key}
    for value in values:
        resource = keys[value.level]
        upsert, forget_words = _statements(conn.dialect.name, value.kind)
        written = conn.execute(
            upsert,
            {
                "tag_key": value.tag_key,
                "resource_key": resource,
                "level": value.level,
                "partition_key": partition_key,
                "watermark": watermark,
                "value": value.value,
            },
        ).first()
        if written is None or value.vr != "PN":
            continue
        conn.execute(forget_words, {"b_tag": value.tag_key, "b_key": resource})
        if value.words:
            conn.execute(
                insert(extended_name_word),
                [
                    {"tag_key": value.tag_key, "resource_key": resource, "word": w[:64], "level": value.level}
                    for w in dict.fromkeys(w[:64] for w in value.words)
                ],
            )


def record_errors(conn: Connection, tag_key: int, rows: Sequence[ReindexRow], messages: Sequence[str]) -> None:
    """Records why instances could not be indexed for a tag (once per instance) and disables querying it: its index
    is incomplete."""
    insert_of = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    now = datetime.now(UTC)
    conn.execute(
        insert_of(extended_query_tag_error).on_conflict_do_nothing(),
        [
            {
                "tag_key": tag_key,
                "watermark": row.watermark,
                "partition_key": row.partition_key,
                "study_uid": row.study_uid,
                "series_uid": row.series_uid,
                "sop_uid": row.sop_uid,
                "created_at": now,
                "message": message,
            }
            for row, message in zip(rows, messages, strict=True)
        ],
    )
    conn.execute(update(extended_query_tag).where(extended_query_tag.c.tag_key == tag_key).values(query_enabled=0))


def forget_deleted(
    conn: Connection,
    watermarks: Sequence[int],
    instance_keys: Sequence[int],
    series_keys: Sequence[int],
    study_keys: Sequence[int],
) -> None:
    """After a delete (same transaction): drops the values and errors of the deleted instances, and the values of
    series and studies that no longer exist (series/study values of remaining rows stay, as Azure keeps them)."""
    gone_series = _missing(conn, series, series.c.series_key, series_keys)
    gone_studies = _missing(conn, study, study.c.study_key, study_keys)
    for table in (*VALUE_TABLES.values(), extended_name_word):
        for level, keys in ((INSTANCE, instance_keys), (SERIES, gone_series), (STUDY, gone_studies)):
            for chunk in in_lists(list(keys)):
                conn.execute(delete(table).where((table.c.level == level) & table.c.resource_key.in_(chunk)))
    for chunk in in_lists(list(watermarks)):
        conn.execute(delete(extended_query_tag_error).where(extended_query_tag_error.c.watermark.in_(chunk)))


def _missing(conn: Connection, table: Table, key_col, keys: Sequence[int]) -> list[int]:
    if not keys:
        return []
    present = set(conn.execute(select(key_col).where(key_col.in_(list(keys)))).scalars())
    return [k for k in keys if k not in present]


# -- the tag list and the re-index ----------------------------------------------------------------------------------
class ExtendedTagStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def write(self) -> AbstractContextManager[Connection]:
        return write_transaction(self.engine)

    def _read(self) -> AbstractContextManager[Connection]:
        return read_transaction(self.engine)

    def list(self, limit: int, offset: int) -> list[ExtendedTag]:
        with self._read() as conn:
            rows = conn.execute(_tags_query().order_by(extended_query_tag.c.tag_key).limit(limit).offset(offset)).all()
        return [_tag(r) for r in rows]

    def get(self, path: str) -> ExtendedTag | None:
        with self._read() as conn:
            row = conn.execute(_GET, {"b_path": path}).first()
        return _tag(row) if row else None

    def by_paths(self, paths: Sequence[str]) -> list[ExtendedTag]:
        with self._read() as conn:
            rows = conn.execute(select(extended_query_tag).where(extended_query_tag.c.path.in_(list(paths)))).all()
        return [_tag(r) for r in rows]

    def add(self, tags: Sequence[NewTag], max_count: int) -> None:
        """Inserts the tags (adding, query enabled); :class:`TagsExist` or :class:`TooManyTags` insert nothing."""
        with self.write() as conn:
            _lock(conn, shared=False)
            paths = [t.path for t in tags]
            existing = conn.execute(
                select(extended_query_tag.c.path).where(extended_query_tag.c.path.in_(paths))
            ).scalars()
            clashes = sorted(existing)
            if clashes:
                raise TagsExist(clashes)
            count = conn.execute(select(func.count()).select_from(extended_query_tag)).scalar_one()
            if count + len(tags) > max_count:
                raise TooManyTags()
            now = datetime.now(UTC)
            conn.execute(
                insert(extended_query_tag),
                [
                    {
                        "path": t.path,
                        "vr": t.vr,
                        "private_creator": t.private_creator,
                        "level": t.level,
                        "status": EXTENDED_ADDING,
                        "query_enabled": 1,
                        "created_at": now,
                    }
                    for t in tags
                ],
            )

    def attach_operation(self, paths: Sequence[str], operation_id: str) -> None:
        with self.write() as conn:
            conn.execute(
                update(extended_query_tag)
                .where(extended_query_tag.c.path.in_(list(paths)) & (extended_query_tag.c.status == EXTENDED_ADDING))
                .values(operation_id=operation_id)
            )

    def finish_adding(self, paths: Sequence[str]) -> None:
        with self.write() as conn:
            conn.execute(
                update(extended_query_tag)
                .where(extended_query_tag.c.path.in_(list(paths)) & (extended_query_tag.c.status == EXTENDED_ADDING))
                .values(status=EXTENDED_READY, operation_id=None)
            )

    def set_query_enabled(self, path: str, enabled: bool) -> bool:
        with self.write() as conn:
            changed = conn.execute(
                update(extended_query_tag)
                .where(extended_query_tag.c.path == path)
                .values(query_enabled=1 if enabled else 0)
            ).rowcount
        return bool(changed)

    def delete(self, paths: Sequence[str]) -> None:
        """Removes tags with their values and errors, in one transaction (stores wait on the lock meanwhile)."""
        with self.write() as conn:
            _lock(conn, shared=False)
            keys = list(
                conn.execute(
                    select(extended_query_tag.c.tag_key).where(extended_query_tag.c.path.in_(list(paths)))
                ).scalars()
            )
            if not keys:
                return
            for table in (*VALUE_TABLES.values(), extended_name_word, extended_query_tag_error):
                conn.execute(delete(table).where(table.c.tag_key.in_(keys)))
            conn.execute(delete(extended_query_tag).where(extended_query_tag.c.tag_key.in_(keys)))

    def errors(self, tag_key: int, limit: int, offset: int) -> list[TagError]:
        err = extended_query_tag_error
        columns = (err.c.study_uid, err.c.series_uid, err.c.sop_uid, err.c.created_at, err.c.message, partition.c.name)
        with self._read() as conn:
            rows = conn.execute(
                select(*columns)
                .join(partition, partition.c.partition_key == err.c.partition_key)
                .where(err.c.tag_key == tag_key)
                .order_by(err.c.watermark)
                .limit(limit)
                .offset(offset)
            ).all()
        return [TagError(*row) for row in rows]

    def watermark_bounds(self) -> tuple[int, int] | None:
        """The lowest and highest watermark of any instance row now (a later store indexes new tags itself)."""
        with self._read() as conn:
            low, high = conn.execute(select(func.min(instance.c.watermark), func.max(instance.c.watermark))).one()
        return None if low is None else (low, high)


def reindex_rows(conn: Connection, low: int, high: int) -> list[ReindexRow]:
    """The created instances with watermarks in [low, high] and their stored JSON. On PostgreSQL the rows are locked
    against deletion until the caller commits, so no value is written for an instance deleted meanwhile."""
    stmt = (
        select(
            instance.c.instance_key,
            instance.c.partition_key,
            instance.c.study_key,
            instance.c.series_key,
            instance.c.watermark,
            instance.c.study_uid,
            instance.c.series_uid,
            instance.c.sop_uid,
            instance_metadata.c.json,
        )
        .join(instance_metadata, instance_metadata.c.watermark == instance.c.watermark)
        .where(instance.c.watermark.between(low, high) & (instance.c.status == INSTANCE_CREATED))
        .order_by(instance.c.watermark)
        .with_for_update(read=True, of=instance)
    )
    return [ReindexRow(*r) for r in conn.execute(stmt).all()]
