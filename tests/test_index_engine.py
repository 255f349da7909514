"""The index engine's hot path: statements run on the driver's cursor (``Prepared``) give what SQLAlchemy's Core
execution gives, on SQLite and PostgreSQL; SQLite's durable and non-durable writes keep their ``synchronous`` level
without switching it per transaction."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, bindparam, insert, select, update

from dicomhub.index.engine import Prepared, dispose, make_engine, migrate, read_transaction, write_transaction
from dicomhub.index.schema import INSTANCE_CREATED, INSTANCE_CREATING, instance, partition
from tests.servers import database_url


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = database_url(request.param) or f"sqlite:///{tmp_path / 'index.db'}"
    migrate(url)
    built = make_engine(url)
    yield built
    dispose(built)


def _partition(engine: Engine) -> int:
    with write_transaction(engine) as conn:
        stmt = insert(partition).values(name="p", created_at=datetime.now(UTC)).returning(partition.c.partition_key)
        return conn.execute(stmt).scalar_one()


def test_prepared_statements_match_core(engine: Engine) -> None:
    """Parameters, constants of the statement, a bind type's processing (time-zone aware datetimes), RETURNING
    rows, and executemany: what Core would store and return."""
    key = _partition(engine)
    reserve = Prepared(insert(instance).returning(instance.c.watermark, instance.c.status))
    mark = Prepared(
        update(instance)
        .where((instance.c.watermark == bindparam("b_watermark")) & (instance.c.status == INSTANCE_CREATING))
        .values(status=INSTANCE_CREATED, blob_key=bindparam("b_blob_key"))
        .returning(instance.c.instance_key)
    )
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    local = created.astimezone(timezone(timedelta(hours=2)))  # the bind type stores it in UTC
    rows = [
        {
            "partition_key": key,
            "study_uid": "1.2",
            "series_uid": "1.3",
            "sop_uid": f"1.4.{i}",
            "watermark": 10 + i,
            "status": INSTANCE_CREATING,
            "created_at": local,
        }
        for i in range(3)
    ]
    with write_transaction(engine) as conn:
        assert reserve.rows(conn, rows[0]) == [(10, INSTANCE_CREATING)]
        Prepared(insert(instance)).run_many(conn, rows[1:])
        ((instance_key,),) = mark.rows(conn, {"b_watermark": 11, "b_blob_key": "k"})
        assert mark.rows(conn, {"b_watermark": 11, "b_blob_key": "again"}) == []  # no longer creating
    with read_transaction(engine) as conn:
        stored = conn.execute(select(instance).order_by(instance.c.watermark)).all()
    assert [r.watermark for r in stored] == [10, 11, 12]
    assert [r.created_at for r in stored] == [created] * 3  # stored in UTC, read back aware, as through Core
    assert [(r.status, r.blob_key) for r in stored] == [
        (INSTANCE_CREATING, None),
        (INSTANCE_CREATED, "k"),
        (INSTANCE_CREATING, None),
    ]
    assert stored[1].instance_key == instance_key


def test_prepared_refuses_what_it_cannot_run_as_core_would(engine: Engine) -> None:
    expanding = Prepared(select(instance.c.watermark).where(instance.c.watermark.in_([1, 2])))
    missing = Prepared(select(instance.c.watermark).where(instance.c.watermark == bindparam("b_watermark")))
    with read_transaction(engine) as conn:
        with pytest.raises(ValueError, match="needs SQLAlchemy"):
            expanding.rows(conn)
        with pytest.raises(ValueError, match="b_watermark"):
            missing.rows(conn)


def test_sqlite_writes_keep_their_synchronous_level(tmp_path: Path) -> None:
    """Durable writes commit with synchronous=FULL (2), non-durable ones with NORMAL (1), each on connections set
    once; a connection used for both (an engine without its sibling) is switched as needed."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        for durable in (True, False, True, False):
            with write_transaction(engine, durable) as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == (2 if durable else 1)
        options = engine.execution_options(compiled_cache=None)  # another Engine object on the same pool
        for durable in (False, True, False, True):
            with write_transaction(options, durable) as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == (2 if durable else 1)
    finally:
        dispose(engine)
