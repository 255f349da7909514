"""Operations and their tasks in the index: creation, lookup, and the claims workers make under a lease.

On PostgreSQL claims use ``FOR UPDATE SKIP LOCKED`` so several worker processes take different tasks without
waiting for each other; on SQLite every write transaction is exclusive (``BEGIN IMMEDIATE``), which serializes claims.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, and_, insert, or_, select, text, update

from dicomhub.index.schema import TASK_DONE, TASK_PENDING, operation, operation_task

ACTIVE = ("notStarted", "running")


@dataclass(frozen=True)
class OperationRecord:
    id: str
    type: str
    status: str
    created_at: datetime
    updated_at: datetime
    parameters: dict[str, Any]
    resources: list[str]
    results: dict[str, Any] | None
    task_count: int
    tasks_done: int


@dataclass(frozen=True)
class ClaimedTask:
    operation: OperationRecord
    number: int
    payload: dict[str, Any]
    attempts: int


def _record(row) -> OperationRecord:
    return OperationRecord(
        id=row.id,
        type=row.type,
        status=row.status,
        created_at=row.created_at,
        updated_at=row.updated_at,
        parameters=json.loads(row.parameters),
        resources=json.loads(row.resources),
        results=json.loads(row.results) if row.results else None,
        task_count=row.task_count,
        tasks_done=row.tasks_done,
    )


def _oldest_active(type: str) -> Select:
    return (
        select(operation)
        .where(operation.c.type == type, operation.c.status.in_(ACTIVE))
        .order_by(operation.c.created_at)
        .limit(1)
    )


class OperationStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def _write(self):
        return self.engine.connect().execution_options(write=True, durable=True)

    # -- clients ------------------------------------------------------------------------------------------------
    def create(
        self, id: str, type: str, parameters: dict, resources: list[str], now: datetime, exclusive: bool
    ) -> OperationRecord:
        """Inserts a ``notStarted`` operation. With ``exclusive``, an active operation of the same type is returned
        instead (checked and inserted under one lock, so two concurrent requests cannot both start one)."""
        with self._write() as conn, conn.begin():
            if exclusive:
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": f"operation:{type}"})
                row = conn.execute(_oldest_active(type)).first()
                if row is not None:
                    return _record(row)
            conn.execute(
                insert(operation).values(
                    id=id,
                    type=type,
                    status="notStarted",
                    created_at=now,
                    updated_at=now,
                    parameters=json.dumps(parameters),
                    resources=json.dumps(resources),
                    task_count=0,
                    tasks_done=0,
                )
            )
            return _record(conn.execute(select(operation).where(operation.c.id == id)).one())

    def get(self, id: str) -> OperationRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(operation).where(operation.c.id == id)).first()
        return _record(row) if row else None

    def active(self, type: str) -> OperationRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_oldest_active(type)).first()
        return _record(row) if row else None

    # -- workers ------------------------------------------------------------------------------------------------
    def claim_coordination(self, owner: str, now: datetime, lease: timedelta) -> OperationRecord | None:
        """An operation that needs planning (``notStarted``) or finishing (every task done), leased to ``owner``."""
        free = or_(operation.c.lease_expires.is_(None), operation.c.lease_expires < now)
        needs_step = or_(
            operation.c.status == "notStarted",
            and_(operation.c.status == "running", operation.c.tasks_done >= operation.c.task_count),
        )
        with self._write() as conn, conn.begin():
            row = conn.execute(
                select(operation)
                .where(needs_step, free)
                .order_by(operation.c.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            conn.execute(
                update(operation).where(operation.c.id == row.id).values(lease_owner=owner, lease_expires=now + lease)
            )
            return _record(row)

    def start_tasks(self, id: str, owner: str, payloads: list[dict], now: datetime) -> bool:
        """Stores the plan of an operation leased to ``owner`` and marks it running (False if the lease was lost)."""
        with self._write() as conn, conn.begin():
            changed = conn.execute(
                update(operation)
                .where(operation.c.id == id, operation.c.lease_owner == owner, operation.c.status == "notStarted")
                .values(
                    status="running", task_count=len(payloads), updated_at=now, lease_owner=None, lease_expires=None
                )
            ).rowcount
            if not changed:
                return False
            if payloads:
                conn.execute(
                    insert(operation_task),
                    [
                        {
                            "operation_id": id,
                            "number": n,
                            "status": TASK_PENDING,
                            "payload": json.dumps(p),
                            "attempts": 0,
                        }
                        for n, p in enumerate(payloads)
                    ],
                )
            return True

    def claim_task(self, owner: str, now: datetime, lease: timedelta) -> ClaimedTask | None:
        with self._write() as conn, conn.begin():
            row = conn.execute(
                select(
                    operation_task.c.operation_id,
                    operation_task.c.number,
                    operation_task.c.payload,
                    operation_task.c.attempts,
                )
                .join(operation, operation.c.id == operation_task.c.operation_id)
                .where(
                    operation_task.c.status == TASK_PENDING,
                    or_(operation_task.c.lease_expires.is_(None), operation_task.c.lease_expires < now),
                    operation.c.status == "running",
                )
                .order_by(operation.c.created_at, operation_task.c.number)
                .limit(1)
                .with_for_update(skip_locked=True, of=operation_task)
            ).first()
            if row is None:
                return None
            conn.execute(
                update(operation_task)
                .where(operation_task.c.operation_id == row.operation_id, operation_task.c.number == row.number)
                .values(lease_owner=owner, lease_expires=now + lease, attempts=row.attempts + 1)
            )
            parent = conn.execute(select(operation).where(operation.c.id == row.operation_id)).one()
            return ClaimedTask(_record(parent), row.number, json.loads(row.payload), row.attempts + 1)

    def extend_task_lease(self, id: str, number: int, owner: str, until: datetime) -> bool:
        with self._write() as conn, conn.begin():
            return bool(
                conn.execute(
                    update(operation_task).where(*self._held(id, number, owner)).values(lease_expires=until)
                ).rowcount
            )

    def complete_task(self, id: str, number: int, owner: str, result: dict, now: datetime) -> bool:
        """Records a task's result, unless its lease was lost (then another worker owns it and its result counts)."""
        with self._write() as conn, conn.begin():
            changed = conn.execute(
                update(operation_task)
                .where(*self._held(id, number, owner))
                .values(status=TASK_DONE, result=json.dumps(result), lease_owner=None, lease_expires=None)
            ).rowcount
            if changed:
                conn.execute(
                    update(operation)
                    .where(operation.c.id == id)
                    .values(tasks_done=operation.c.tasks_done + 1, updated_at=now)
                )
            return bool(changed)

    def release_task(self, id: str, number: int, owner: str, retry_at: datetime) -> None:
        """Gives a failed task back, to be tried again from ``retry_at``."""
        with self._write() as conn, conn.begin():
            conn.execute(
                update(operation_task)
                .where(*self._held(id, number, owner))
                .values(lease_owner=None, lease_expires=retry_at)
            )

    @staticmethod
    def _held(id: str, number: int, owner: str):
        return (
            operation_task.c.operation_id == id,
            operation_task.c.number == number,
            operation_task.c.lease_owner == owner,
            operation_task.c.status == TASK_PENDING,
        )

    def task_results(self, id: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(operation_task.c.result)
                .where(operation_task.c.operation_id == id, operation_task.c.status == TASK_DONE)
                .order_by(operation_task.c.number)
            ).all()
        return [json.loads(r.result) for r in rows]

    def finish(self, id: str, owner: str | None, status: str, results: dict | None, now: datetime) -> bool:
        """Sets the terminal status (``owner`` None: whoever holds it, e.g. to fail an operation a task broke)."""
        conditions = [operation.c.id == id, operation.c.status.in_(ACTIVE)]
        if owner is not None:
            conditions.append(operation.c.lease_owner == owner)
        with self._write() as conn, conn.begin():
            return bool(
                conn.execute(
                    update(operation)
                    .where(*conditions)
                    .values(
                        status=status,
                        results=json.dumps(results) if results is not None else None,
                        updated_at=now,
                        lease_owner=None,
                        lease_expires=None,
                    )
                ).rowcount
            )

    def release_all_leases(self) -> int:
        """Embedded mode at start-up: no other process runs, so every lease is a crashed worker's."""
        with self._write() as conn, conn.begin():
            tasks = conn.execute(
                update(operation_task)
                .where(operation_task.c.lease_owner.is_not(None))
                .values(lease_owner=None, lease_expires=None)
            ).rowcount
            conn.execute(
                update(operation)
                .where(operation.c.lease_owner.is_not(None))
                .values(lease_owner=None, lease_expires=None)
            )
            return tasks
