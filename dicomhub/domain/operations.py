"""Long-running operations (re-index, bulk update): the durable engine the features run on.

An operation is created ``notStarted``. A worker *plans* it (the handler cuts it into tasks, e.g. watermark ranges),
workers run the tasks under leases, and the worker that completes the last one *finishes* it (the handler turns the
task results into the operation's status and results). Every step is committed before the next, so a worker that
dies loses at most its current task, which another worker takes up once the lease expires (or at once, when the
embedded server restarts). Handlers' tasks must be idempotent: a task cut short by a crash runs again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from dicomhub.config import Settings
from dicomhub.domain.errors import Conflict, ResourceNotFound
from dicomhub.index.operations import ClaimedTask, OperationRecord, OperationStore

log = logging.getLogger("dicomhub.operations")

MAX_TASK_ATTEMPTS = 3


class OperationType(StrEnum):
    REINDEX = "reindex"
    UPDATE = "update"
    EXPORT = "export"
    IMPORT = "import"


class OperationStatus(StrEnum):
    NOT_STARTED = "notStarted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = {OperationStatus.SUCCEEDED, OperationStatus.FAILED, OperationStatus.CANCELED}


@dataclass(frozen=True)
class Operation(OperationRecord):
    """An operation as the domain sees it: the stored record with its type and status as enums."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", OperationType(self.type))
        object.__setattr__(self, "status", OperationStatus(self.status))

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def percent_complete(self) -> int:
        """Share of tasks done; 100 only once succeeded (the finishing step still has work to do before)."""
        if self.status == OperationStatus.SUCCEEDED:
            return 100
        if not self.task_count:
            return 0
        done = self.tasks_done * 100 // self.task_count
        return done if self.finished else min(done, 99)

    @classmethod
    def of(cls, record: OperationRecord) -> Operation:
        return cls(**vars(record))


class TaskLease:
    """Handed to a running task: ``keep()`` extends the lease during long work and tells whether it is still held
    (False: another worker took the task over, so this one must stop without writing more)."""

    def __init__(self, store: OperationStore, task: ClaimedTask, owner: str, duration: timedelta) -> None:
        self._store = store
        self._task = task
        self._owner = owner
        self._duration = duration
        self._renewed = time.monotonic()

    def keep(self) -> bool:
        if time.monotonic() - self._renewed < self._duration.total_seconds() / 3:
            return True
        self._renewed = time.monotonic()
        until = datetime.now(UTC) + self._duration
        return self._store.extend_task_lease(self._task.operation.id, self._task.number, self._owner, until)


class OperationHandler(Protocol):
    """What a kind of operation does; the engine calls it from worker threads/processes."""

    type: OperationType

    def plan(self, operation: Operation) -> list[dict[str, Any]]:
        """The operation's tasks (JSON-able payloads); quick, read-only."""
        ...

    def run_task(self, operation: Operation, payload: dict[str, Any], lease: TaskLease) -> dict[str, Any]:
        """Does one task (idempotently) and returns its JSON-able result."""
        ...

    def finish(self, operation: Operation, results: list[dict[str, Any]]) -> tuple[OperationStatus, dict | None]:
        """The final status and results, from every task's result."""
        ...


def retry_delay(attempts: int) -> timedelta:
    """Back-off before a failed task is tried again."""
    return timedelta(seconds=2**attempts)


def new_operation_id() -> str:
    return uuid.uuid4().hex


def parse_operation_id(text: str) -> str:
    """The 32-hex form of a GUID given with or without dashes/braces; unknown forms are simply not found."""
    try:
        return uuid.UUID(text.strip()).hex
    except ValueError as exc:
        raise ResourceNotFound(f"The specified operation '{text}' could not be found: it is not a GUID.") from exc


class OperationService:
    """What clients do with operations: start one, look one up."""

    def __init__(self, store: OperationStore) -> None:
        self.store = store

    def start(
        self, type: OperationType, parameters: dict[str, Any], resources: list[str], exclusive: bool = False
    ) -> Operation:
        """A new ``notStarted`` operation; ``exclusive``: 409 while another of the same type is active."""
        new_id = new_operation_id()
        record = self.store.create(new_id, type.value, parameters, resources, datetime.now(UTC), exclusive)
        if record.id != new_id:
            raise ActiveOperationConflict(Operation.of(record))
        return Operation.of(record)

    def get(self, operation_id: str) -> Operation:
        record = self.store.get(parse_operation_id(operation_id))
        if record is None:
            raise ResourceNotFound(f"The specified operation '{operation_id}' could not be found.")
        return Operation.of(record)

    def active(self, type: OperationType) -> Operation | None:
        record = self.store.active(type.value)
        return Operation.of(record) if record else None


class ActiveOperationConflict(Conflict):
    """Another operation of the same kind is still running (Azure allows one update at a time)."""

    def __init__(self, active: Operation) -> None:
        super().__init__(f"There is already an active {active.type.value} operation with ID '{active.id}'.")
        self.active = active


class OperationWorker:
    """Claims and runs operation steps: planning, tasks, finishing. Run inside the server (embedded default) or as
    ``dicomhub worker`` processes; any number may run at once."""

    def __init__(self, store: OperationStore, handlers: list[OperationHandler], settings: Settings) -> None:
        self.store = store
        self.handlers = {h.type: h for h in handlers}
        self.lease = timedelta(seconds=settings.operation_lease_seconds)
        self.poll_seconds = settings.operation_poll_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def run_once(self) -> bool:
        """One step of work, if any is waiting; True when something was done."""
        now = datetime.now(UTC)
        coordinated = self.store.claim_coordination(self.owner, now, self.lease)
        if coordinated is not None:
            self._coordinate(Operation.of(coordinated))
            return True
        task = self.store.claim_task(self.owner, now, self.lease)
        if task is not None:
            self._run_task(task)
            return True
        return False

    def run(self, stop: threading.Event) -> None:
        """Works until ``stop`` is set; sleeps ``poll_seconds`` whenever nothing is waiting."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("operation worker step failed")
                busy = False
            if not busy:
                stop.wait(self.poll_seconds)

    def _coordinate(self, operation: Operation) -> None:
        handler = self.handlers[operation.type]
        now = datetime.now(UTC)
        try:
            if operation.status == OperationStatus.NOT_STARTED:
                payloads = handler.plan(operation)
                self.store.start_tasks(operation.id, self.owner, payloads, now)
                log.info("operation planned", extra={"operation": operation.id, "tasks": len(payloads)})
                return
            status, results = handler.finish(operation, self.store.task_results(operation.id))
        except Exception as exc:
            log.exception("operation step failed", extra={"operation": operation.id})
            status, results = OperationStatus.FAILED, {"errors": [f"The operation failed: {exc}"]}
        self.store.finish(operation.id, self.owner, status.value, results, datetime.now(UTC))
        log.info("operation finished", extra={"operation": operation.id, "status": status.value})

    def _run_task(self, task: ClaimedTask) -> None:
        operation = Operation.of(task.operation)
        handler = self.handlers[operation.type]
        lease = TaskLease(self.store, task, self.owner, self.lease)
        try:
            result = handler.run_task(operation, task.payload, lease)
        except Exception as exc:
            log.exception("operation task failed", extra={"operation": operation.id, "task": task.number})
            if task.attempts >= MAX_TASK_ATTEMPTS:
                message = f"Task {task.number} failed {task.attempts} times: {exc}"
                self.store.finish(
                    operation.id, None, OperationStatus.FAILED.value, {"errors": [message]}, datetime.now(UTC)
                )
            else:
                retry_at = datetime.now(UTC) + retry_delay(task.attempts)
                self.store.release_task(operation.id, task.number, self.owner, retry_at)
            return
        self.store.complete_task(operation.id, task.number, self.owner, result, datetime.now(UTC))
