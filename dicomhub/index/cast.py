"""DICOMcast's durable state in the index: the cursor (last change-feed sequence cast), the lease that lets one
runner at a time follow the feed across processes and machines, and the entries it skipped or cast incompletely.

The cursor only moves under the lease, in the same transaction that records the entry's failures, so a runner
that lost its lease (paused past its expiry while another took over) cannot move it backwards or twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from dicomhub.index.engine import write_transaction
from dicomhub.index.schema import cast_failure, cast_state


@dataclass(frozen=True)
class CastFailure:
    """An entry cast without an invalid attribute (``partial``) or not cast at all (``skipped``)."""

    sequence: int
    action: str
    partition_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    outcome: str
    reason: str
    created_at: datetime | None = None


class IndexCastState:
    """The state of the cast named ``name`` (one per followed archive) in the index."""

    def __init__(self, engine: Engine, name: str, lease_seconds: float) -> None:
        self.engine = engine
        self.name = name
        self.lease = timedelta(seconds=lease_seconds)

    def acquire(self, owner: str) -> bool:
        """Takes or renews the lease; False while another runner holds it."""
        now = datetime.now(UTC)
        with write_transaction(self.engine) as conn:
            taken = conn.execute(
                update(cast_state)
                .where(
                    cast_state.c.name == self.name,
                    or_(
                        cast_state.c.lease_owner == owner,
                        cast_state.c.lease_owner.is_(None),
                        cast_state.c.lease_expires < now,
                    ),
                )
                .values(lease_owner=owner, lease_expires=now + self.lease)
            ).rowcount
            if taken:
                return True
            exists = conn.execute(select(cast_state.c.name).where(cast_state.c.name == self.name)).first()
            if exists is not None:
                return False
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(
                    insert(cast_state).values(
                        name=self.name, cursor=0, lease_owner=owner, lease_expires=now + self.lease, updated_at=now
                    )
                )
        except IntegrityError:  # another runner created the row first: it holds the lease
            return False
        return True

    def release(self, owner: str) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(cast_state)
                .where(cast_state.c.name == self.name, cast_state.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires=None)
            )

    def cursor(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(select(cast_state.c.cursor).where(cast_state.c.name == self.name)).scalar()
        return value or 0

    def advance(self, owner: str, sequence: int, failures: Sequence[CastFailure] = ()) -> bool:
        """Moves the cursor to ``sequence`` and records the entry's failures, renewing the lease; False (nothing
        written) when ``owner`` no longer holds the lease."""
        now = datetime.now(UTC)
        with write_transaction(self.engine) as conn:
            moved = conn.execute(
                update(cast_state)
                .where(
                    cast_state.c.name == self.name,
                    cast_state.c.lease_owner == owner,
                    cast_state.c.cursor < sequence,
                )
                .values(cursor=sequence, lease_expires=now + self.lease, updated_at=now)
            ).rowcount
            if not moved:
                return False
            if failures:
                conn.execute(
                    insert(cast_failure),
                    [
                        {
                            "name": self.name,
                            "sequence": f.sequence,
                            "action": f.action,
                            "partition_name": f.partition_name,
                            "study_uid": f.study_uid,
                            "series_uid": f.series_uid,
                            "sop_uid": f.sop_uid,
                            "outcome": f.outcome,
                            "reason": f.reason,
                            "created_at": now,
                        }
                        for f in failures
                    ],
                )
        return True

    def failures(self, limit: int = 1000) -> list[CastFailure]:
        """The most recent failures, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(cast_failure)
                .where(cast_failure.c.name == self.name)
                .order_by(cast_failure.c.sequence.desc(), cast_failure.c.id.desc())
                .limit(limit)
            ).all()
        return [
            CastFailure(
                r.sequence,
                r.action,
                r.partition_name,
                r.study_uid,
                r.series_uid,
                r.sop_uid,
                r.outcome,
                r.reason,
                r.created_at,
            )
            for r in reversed(rows)
        ]
