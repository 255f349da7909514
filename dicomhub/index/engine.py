"""Engine creation for SQLite (WAL, durable commits) and PostgreSQL, and schema migration with Alembic."""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.sql.base import Executable

MIGRATIONS = Path(__file__).parent / "migrations"


# SQLite: the engine of an engine's non-durable writes (same file, its own connections, synchronous=NORMAL)
_NOT_DURABLE: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url, durable=True)
        _NOT_DURABLE[engine] = _sqlite_engine(url, durable=False)
        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _sqlite_engine(url: str, durable: bool) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=8)
    _configure_sqlite(engine, durable, _writer_lock(engine.url.database))
    return engine


class WriterLock:
    """Writers of one SQLite file take turns here before ``BEGIN IMMEDIATE``: threads of this process through a
    lock, processes through ``flock`` on a file beside the database.

    Without it a writer that finds the database locked sleeps in SQLite's busy handler (1, 2, 5, 10 ... ms) however
    soon the lock is free; with two server processes and a thread pool each, concurrent stores spent most of their
    time asleep. The lock is taken at the start of a write transaction and given back when its connection returns
    to the pool, after the commit. Processes that do not take it (the sqlite3 shell) still meet the busy handler.
    """

    def __init__(self, path: str) -> None:
        self._threads = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self) -> None:
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_WRITER_LOCKS: dict[str, WriterLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(database: str | None) -> WriterLock | None:
    """The one lock of a database file in this process (its durable and non-durable engines share it)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = str(Path(database).resolve()) + "-writer.lock"
    with _WRITER_LOCKS_GUARD:
        if path not in _WRITER_LOCKS:
            _WRITER_LOCKS[path] = WriterLock(path)
        return _WRITER_LOCKS[path]


@contextmanager
def write_transaction(engine: Engine, durable: bool = True) -> Iterator[Connection]:
    """A write transaction (SQLite begins it IMMEDIATE); ``durable=False`` lets SQLite skip the fsync of this
    commit (a later durable commit flushes it too, since the WAL is sequential).

    On SQLite the two kinds run on two sets of connections, each with its ``synchronous`` level set once when it
    connects: switching the level per transaction cost two statements of every store."""
    if not durable:
        engine = _NOT_DURABLE.get(engine, engine)
    with engine.connect().execution_options(write=True, durable=durable) as conn, conn.begin():
        yield conn


def dispose(engine: Engine) -> None:
    """Closes the engine's connections (and those of its SQLite non-durable writes)."""
    sibling = _NOT_DURABLE.get(engine)
    if sibling is not None:
        sibling.dispose()
    engine.dispose()


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read transaction (SQLite begins it deferred: it takes no write lock)."""
    with engine.connect() as conn, conn.begin():
        yield conn


def utc_now() -> datetime:
    return datetime.now(UTC)


class Prepared:
    """A Core statement compiled once per dialect and set of parameter names, then run on the DBAPI cursor.

    For the dozen statements of every store: SQLAlchemy's per-execution work (cache key, parameter assembly, result
    objects) took 15-30 µs each, more than SQLite takes to run them. The SQL, parameter order, bind types'
    processing (e.g. SQLite's datetime text) and constants are SQLAlchemy's own, worked out at compile time;
    statements needing more (Python-side defaults, expanding IN lists, escaped names) are refused then. The
    statement runs in the caller's transaction; rows come back as tuples in the order of the returned columns.
    """

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._plans: dict[tuple[str, tuple[str, ...]], tuple[str, list[tuple[str, Any, Any]], bool]] = {}

    def _plan(self, conn: Connection, names: tuple[str, ...]) -> tuple[str, list[tuple[str, Any, Any]], bool]:
        dialect = conn.dialect
        compiled = self.statement.compile(dialect=dialect, column_keys=list(names))
        if (
            compiled.insert_prefetch
            or compiled.update_prefetch
            or compiled.literal_execute_params
            or compiled.post_compile_params
            or compiled.escaped_bind_names
        ):
            raise ValueError(f"statement needs SQLAlchemy's execution: {compiled.string}")
        order = compiled.positiontup if compiled.positional else list(compiled.binds)
        binds = []
        for name in order:
            bind = compiled.binds[name]
            if bind.required and name not in names:
                raise ValueError(f"a value is required for bind parameter {name!r}")
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            constant = _PARAMETER if name in names else bind.effective_value
            binds.append((name, processor, constant))
        return compiled.string, binds, bool(compiled.positional)

    def _parameters(self, conn: Connection, params: Mapping[str, Any]) -> tuple[str, Any]:
        key = (conn.dialect.name, tuple(params))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(conn, key[1])
        sql, binds, positional = plan
        values = [
            (params[name] if constant is _PARAMETER else constant) if processor is None
            else processor(params[name] if constant is _PARAMETER else constant)
            for name, processor, constant in binds
        ]  # fmt: skip
        return sql, values if positional else dict(zip((b[0] for b in binds), values, strict=True))

    def rows(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Runs the statement once; its rows (none without RETURNING or a select list)."""
        sql, values = self._parameters(conn, params or {})
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql, values)
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        finally:
            cursor.close()

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Runs the statement once per parameter set (no rows back); all sets have the same names."""
        if not rows:
            return
        prepared = [self._parameters(conn, r) for r in rows]
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(prepared[0][0], [values for _, values in prepared])
        finally:
            cursor.close()


_PARAMETER = object()  # a bind the caller's parameters fill, as opposed to a constant of the statement

IN_LIST_SIZE = 500  # values per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits


def in_lists(items: list) -> Iterator[list]:
    """``items`` cut into lists of at most :data:`IN_LIST_SIZE`, one ``IN`` clause each."""
    for i in range(0, len(items), IN_LIST_SIZE):
        yield items[i : i + IN_LIST_SIZE]


def _configure_sqlite(engine: Engine, durable: bool, writers: WriterLock | None) -> None:
    """WAL for concurrent readers; ``synchronous=FULL`` so a commit is on disk when it returns (``NORMAL`` for the
    connections of non-durable writes).

    pysqlite's own transaction handling is switched off so that writers can ``BEGIN IMMEDIATE`` (take the write
    lock up front instead of failing on lock upgrade) while readers ``BEGIN`` deferred.
    """
    synchronous = "FULL" if durable else "NORMAL"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=60000")
        # values are folded before they are stored and compared, so a case-sensitive LIKE loses nothing and lets
        # SQLite answer prefix patterns from the ordinary indexes
        cursor.execute("PRAGMA case_sensitive_like=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # statements straight on the sqlite3 connection: SQLAlchemy's execution of a BEGIN cost more than SQLite's
        driver = conn.connection.driver_connection
        options = conn.get_execution_options()
        if options.get("write"):
            wanted = "FULL" if options.get("durable", True) else "NORMAL"
            info = conn.connection.info
            if writers is not None and "writer_lock" not in info:
                writers.acquire()
                info["writer_lock"] = writers
            if info.get("synchronous", synchronous) != wanted:  # only when the other engine is not at hand
                driver.execute(f"PRAGMA synchronous={wanted}")
                info["synchronous"] = wanted
            driver.execute("BEGIN IMMEDIATE")
        else:
            driver.execute("BEGIN DEFERRED")

    def _next_writer(_dbapi_connection, record, *_: object) -> None:  # after the commit or rollback
        held = record.info.pop("writer_lock", None)
        if held is not None:
            held.release()

    for returned in ("checkin", "invalidate", "soft_invalidate", "detach", "close"):
        event.listen(engine, returned, _next_writer)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Brings the index schema to the latest revision."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
