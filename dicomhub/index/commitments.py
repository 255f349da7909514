"""Storage commitment requests whose N-EVENT-REPORT is not delivered yet (``dimse_commitment``).

The DIMSE listener writes a row (durably) before it answers the N-ACTION, so a restart between the request and the
report loses nothing: the listener delivers the rows it finds when it starts. ``due_at`` is when a delivery may
next be tried; a deliverer claims a row by moving it forward (compare-and-set), so two listeners on one index do not
both send it. The row goes when the report is delivered or given up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, insert, select, update

from dicomhub.index.schema import dimse_commitment


@dataclass(frozen=True)
class PendingCommitment:
    key: int
    calling_aet: str
    partition_name: str
    transaction_uid: str
    references: list[tuple[str, str]]  # (SOP class UID, SOP instance UID) as requested
    created_at: datetime


class CommitmentStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _write(self):
        return self.engine.connect().execution_options(write=True, durable=True)

    def add(
        self,
        calling_aet: str,
        partition_name: str,
        transaction_uid: str,
        references: list[tuple[str, str]],
        due_at: datetime,
    ) -> None:
        with self._write() as conn, conn.begin():
            conn.execute(
                insert(dimse_commitment).values(
                    calling_aet=calling_aet,
                    partition_name=partition_name,
                    transaction_uid=transaction_uid,
                    sop_references=json.dumps(references),
                    created_at=datetime.now(UTC),
                    due_at=due_at,
                )
            )

    def claim_due(self, now: datetime, lease: timedelta, limit: int = 100) -> list[PendingCommitment]:
        """The rows due at ``now``, each moved ``lease`` forward (its next try, unless delivered or rescheduled)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(dimse_commitment)
                .where(dimse_commitment.c.due_at <= now)
                .order_by(dimse_commitment.c.due_at)
                .limit(limit)
            ).all()
        claimed = []
        for row in rows:
            if self.reschedule(row.commitment_key, now + lease, expected_due=row.due_at):
                references = [(sop_class, sop_uid) for sop_class, sop_uid in json.loads(row.sop_references)]
                claimed.append(
                    PendingCommitment(
                        row.commitment_key,
                        row.calling_aet,
                        row.partition_name,
                        row.transaction_uid,
                        references,
                        row.created_at,
                    )
                )
        return claimed

    def reschedule(self, key: int, due_at: datetime, expected_due: datetime | None = None) -> bool:
        """Moves a row's next try; with ``expected_due``, only if nobody moved it since (False otherwise)."""
        condition = [dimse_commitment.c.commitment_key == key]
        if expected_due is not None:
            condition.append(dimse_commitment.c.due_at == expected_due)
        with self._write() as conn, conn.begin():
            return conn.execute(update(dimse_commitment).where(*condition).values(due_at=due_at)).rowcount == 1

    def next_due(self) -> datetime | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.min(dimse_commitment.c.due_at))).scalar()

    def remove(self, key: int) -> None:
        with self._write() as conn, conn.begin():
            conn.execute(delete(dimse_commitment).where(dimse_commitment.c.commitment_key == key))
