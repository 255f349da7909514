"""The operations engine: planning, leased tasks shared by workers, crash take-over, failure, and the HTTP route.

The features built on it (extended query tags, bulk update) test it end to end through the server; these tests
drive the engine directly on real SQLite and PostgreSQL indexes with a small handler, to pin down the guarantees
those features rely on: every task done exactly once by concurrent workers, a dead worker's task taken over.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from dicomhub.config import Settings
from dicomhub.domain.operations import (
    ActiveOperationConflict,
    OperationStatus,
    OperationType,
)
from dicomhub.services import Services, build_services
from tests.servers import database_url


class CountingHandler:
    """Squares numbers, one task per number; records which worker ran each task."""

    type = OperationType.REINDEX

    def __init__(self, tasks: int, delay: float = 0.0, fail_task: int | None = None) -> None:
        self.tasks = tasks
        self.delay = delay
        self.fail_task = fail_task
        self.runs: Counter[int] = Counter()
        self.lock = threading.Lock()

    def plan(self, operation):
        return [{"n": n} for n in range(self.tasks)]

    def run_task(self, operation, payload, lease):
        with self.lock:
            self.runs[payload["n"]] += 1
        if payload["n"] == self.fail_task:
            raise RuntimeError("disk on fire")
        time.sleep(self.delay)
        assert lease.keep()
        return {"square": payload["n"] ** 2}

    def finish(self, operation, results):
        return OperationStatus.SUCCEEDED, {"total": sum(r["square"] for r in results), "parts": len(results)}


@pytest.fixture(params=["sqlite", "postgres"])
def services(request, tmp_path) -> Services:
    url = database_url(request.param)
    settings = Settings(data_dir=tmp_path, database_url=url, operation_poll_seconds=0.01, operation_lease_seconds=30)
    built = build_services(settings)
    yield built
    built.index.engine.dispose()


def _drain(services: Services, workers: int, operation_id: str) -> None:
    """Runs ``workers`` worker threads until the operation is finished."""
    stop = threading.Event()
    threads = [threading.Thread(target=services.operation_worker().run, args=(stop,)) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if services.operations.get(operation_id).finished:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _start(services: Services, **kwargs):
    return services.operations.start(OperationType.REINDEX, {"why": "test"}, ["extendedquerytags/00101010"], **kwargs)


def test_concurrent_workers_do_every_task_exactly_once(services: Services) -> None:
    handler = CountingHandler(tasks=40, delay=0.005)
    services.operation_handlers.append(handler)
    op = _start(services)
    assert services.operations.get(op.id).status == OperationStatus.NOT_STARTED
    _drain(services, workers=4, operation_id=op.id)
    done = services.operations.get(op.id)
    assert done.status == OperationStatus.SUCCEEDED
    assert done.percent_complete == 100
    assert done.results == {"total": sum(n * n for n in range(40)), "parts": 40}
    assert sorted(handler.runs) == list(range(40))
    assert set(handler.runs.values()) == {1}, "a task ran twice"


def test_a_dead_workers_task_is_taken_over_after_its_lease(services: Services) -> None:
    handler = CountingHandler(tasks=3)
    services.operation_handlers.append(handler)
    op = _start(services)
    store = services.operations.store
    dead = services.operation_worker()
    assert dead.run_once()  # plans
    now = datetime.now(UTC)
    claimed = store.claim_task("dead-worker", now, timedelta(seconds=0.2))  # ...and dies holding task 0
    assert claimed is not None and claimed.number == 0
    time.sleep(0.3)
    _drain(services, workers=1, operation_id=op.id)
    assert services.operations.get(op.id).status == OperationStatus.SUCCEEDED
    assert handler.runs[0] == 1
    # the dead worker's late result is refused: the task was completed by its new owner
    assert not store.complete_task(op.id, 0, "dead-worker", {"square": -1}, datetime.now(UTC))
    assert services.operations.get(op.id).results["total"] == 0 + 1 + 4


def test_released_leases_resume_at_once(services: Services) -> None:
    handler = CountingHandler(tasks=2)
    services.operation_handlers.append(handler)
    op = _start(services)
    services.operation_worker().run_once()
    store = services.operations.store
    assert store.claim_task("crashed", datetime.now(UTC), timedelta(hours=1)) is not None
    assert store.release_all_leases() == 1  # what `dicomhub serve` does at start-up in embedded mode
    _drain(services, workers=1, operation_id=op.id)
    assert services.operations.get(op.id).status == OperationStatus.SUCCEEDED


def test_a_task_failing_every_attempt_fails_the_operation(services: Services, monkeypatch) -> None:
    monkeypatch.setattr("dicomhub.domain.operations.retry_delay", lambda attempts: timedelta(0))
    handler = CountingHandler(tasks=3, fail_task=1)
    services.operation_handlers.append(handler)
    op = _start(services)
    _drain(services, workers=2, operation_id=op.id)
    failed = services.operations.get(op.id)
    assert failed.status == OperationStatus.FAILED
    assert handler.runs[1] == 3
    assert "disk on fire" in failed.results["errors"][0]


def test_exclusive_start_refuses_a_second_active_operation(services: Services) -> None:
    first = _start(services, exclusive=True)
    with pytest.raises(ActiveOperationConflict) as conflict:
        _start(services, exclusive=True)
    assert conflict.value.active.id == first.id
    assert first.id in conflict.value.message


def test_unknown_operation_is_404(http, version) -> None:
    unknown = uuid.uuid4().hex
    response = http.get(f"/{version}/operations/{unknown}")
    assert response.status_code == 404
    assert unknown in response.text
    response = http.get(f"/{version}/operations/not-a-guid")
    assert response.status_code == 404
    assert "not a GUID" in response.text
