"""Engine creation for SQLite (WAL, durable commits) and PostgreSQL, and schema migration with Alembic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=8)
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


@contextmanager
def write_transaction(engine: Engine, durable: bool = True) -> Iterator[Connection]:
    """A write transaction (SQLite begins it IMMEDIATE); ``durable=False`` lets SQLite skip the fsync of this
    commit (a later durable commit flushes it too, since the WAL is sequential)."""
    with engine.connect().execution_options(write=True, durable=durable) as conn, conn.begin():
        yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    """A read transaction (SQLite begins it deferred: it takes no write lock)."""
    with engine.connect() as conn, conn.begin():
        yield conn


def utc_now() -> datetime:
    return datetime.now(UTC)


IN_LIST_SIZE = 500  # values per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits


def in_lists(items: list) -> Iterator[list]:
    """``items`` cut into lists of at most :data:`IN_LIST_SIZE`, one ``IN`` clause each."""
    for i in range(0, len(items), IN_LIST_SIZE):
        yield items[i : i + IN_LIST_SIZE]


def _configure_sqlite(engine: Engine) -> None:
    """WAL for concurrent readers; ``synchronous=FULL`` so a commit is on disk when it returns.

    pysqlite's own transaction handling is switched off so that writers can ``BEGIN IMMEDIATE`` (take the write
    lock up front instead of failing on lock upgrade) while readers ``BEGIN`` deferred.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        # values are folded before they are stored and compared, so a case-sensitive LIKE loses nothing and lets
        # SQLite answer prefix patterns from the ordinary indexes
        cursor.execute("PRAGMA case_sensitive_like=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        options = conn.get_execution_options()
        if options.get("write"):
            conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if options.get('durable', True) else 'NORMAL'}")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN DEFERRED")


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
