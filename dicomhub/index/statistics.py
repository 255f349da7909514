"""How big the index has grown: a cheap measure (one index lookup) for deciding when planner statistics are stale."""

from __future__ import annotations

from sqlalchemy import func, select

from dicomhub.index.repository import Index
from dicomhub.index.schema import instance


def instance_high_water(index: Index) -> int:
    """The largest instance key handed out so far: grows with every stored instance (deletes do not lower it)."""
    with index.read() as conn:
        return conn.execute(select(func.max(instance.c.instance_key))).scalar() or 0
