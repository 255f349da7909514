"""DICOMcast's state when it follows a remote archive: a JSON file (cursor and failures) replaced atomically, and
an exclusive lock on a file beside it as the lease (one runner per state file; the lock goes with a dead process).

The index-backed state (``dicomhub.index.cast.IndexCastState``) has the same methods.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from dicomhub.index.cast import CastFailure

KEPT_FAILURES = 1000


class CastState(Protocol):
    def acquire(self, owner: str) -> bool: ...

    def release(self, owner: str) -> None: ...

    def cursor(self) -> int: ...

    def advance(self, owner: str, sequence: int, failures: Sequence[CastFailure] = ()) -> bool: ...

    def failures(self, limit: int = KEPT_FAILURES) -> list[CastFailure]: ...


class FileCastState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: int | None = None

    def acquire(self, owner: str) -> bool:
        if self._lock is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock = fd
        return True

    def release(self, owner: str) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing drops the lock
            self._lock = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"cursor": 0, "failures": []}

    def cursor(self) -> int:
        return int(self._read()["cursor"])

    def advance(self, owner: str, sequence: int, failures: Sequence[CastFailure] = ()) -> bool:
        if self._lock is None:
            return False
        state = self._read()
        if sequence <= state["cursor"]:
            return False
        now = datetime.now(UTC).isoformat()
        recorded = state["failures"] + [{**f.__dict__, "created_at": now} for f in failures]
        state = {"cursor": sequence, "failures": recorded[-KEPT_FAILURES:]}
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w") as file:
            json.dump(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return True

    def failures(self, limit: int = KEPT_FAILURES) -> list[CastFailure]:
        rows = self._read()["failures"][-limit:]
        return [CastFailure(**{**r, "created_at": datetime.fromisoformat(r["created_at"])}) for r in rows]
