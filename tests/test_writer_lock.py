"""SQLite writers take turns through the writer lock, and always give it back (commit, rollback, broken connection)."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest
from sqlalchemy import text

from dicomhub.index.engine import make_engine, read_transaction, write_transaction


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    with write_transaction(engine) as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    yield engine
    engine.dispose()


def other_process_could_write(lock_file) -> bool:
    """Whether another process would get the writer lock now (a second open file description acts like one)."""
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_lock_comes_back_after_commit_and_after_rollback(engine, tmp_path):
    lock_file = tmp_path / "index.db-writer.lock"
    with write_transaction(engine) as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
        assert not other_process_could_write(lock_file)
    assert other_process_could_write(lock_file)
    with read_transaction(engine) as conn:  # readers take no turn
        assert not conn.execute(text("SELECT n FROM t WHERE n = 9")).all()
        assert other_process_could_write(lock_file)
    with pytest.raises(RuntimeError), write_transaction(engine) as conn:
        conn.execute(text("INSERT INTO t VALUES (2)"))
        raise RuntimeError("abandoned")
    assert other_process_could_write(lock_file)
    with write_transaction(engine, durable=False) as conn:  # the non-durable engine shares the lock
        conn.execute(text("INSERT INTO t VALUES (3)"))
    with read_transaction(engine) as conn:
        assert [r[0] for r in conn.execute(text("SELECT n FROM t ORDER BY n"))] == [1, 3]
    assert other_process_could_write(lock_file)


def test_a_second_writer_starts_only_after_the_first_commits(engine):
    """The second writer waits on the lock (not in SQLite's busy handler): its transaction begins after the first
    one's commit, and both rows are there."""
    holding = threading.Event()
    events: list[str] = []

    def first() -> None:
        with write_transaction(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
            holding.set()
            time.sleep(0.2)  # long enough for the second writer to be waiting
            events.append("first commits")

    def second() -> None:
        holding.wait(10)
        with write_transaction(engine) as conn:
            events.append("second begins")
            conn.execute(text("INSERT INTO t VALUES (2)"))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert events == ["first commits", "second begins"]
    with read_transaction(engine) as conn:
        assert [r[0] for r in conn.execute(text("SELECT n FROM t ORDER BY n"))] == [1, 2]
