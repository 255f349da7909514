"""The audit log: one JSON line per request (who, what, which UIDs, outcome), never PHI.

A line holds identities (subject, client, roles), the route template (not the URL), the names of the query keys
(not their values) and UIDs; no attribute values and no bodies. Each line is one ``os.write`` to a file opened
with ``O_APPEND``: written whole at the position of the end of the file, so several worker processes can share
one file without interleaving, and handed to the kernel before the answer's last byte, so a crashing process
loses no line of a request it answered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from dicomhub.domain.store import StoreResult

STORED_INSTANCES = "audit_instances"  # key in the request's scope state, set by the STOW handler


class AuditLog:
    """Appends JSON lines to a file, or to standard output for ``-``."""

    def __init__(self, destination: str) -> None:
        if destination == "-":
            self.fd = 1
        else:
            self.fd = os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        while line:
            line = line[os.write(self.fd, line) :]


def record_stored_instances(request: Request, results: Iterable[StoreResult]) -> None:
    """Hands the UIDs of each instance of a STOW request (stored or refused) to the audit line of the request."""
    setattr(
        request.state,
        STORED_INSTANCES,
        [{"study": r.study_uid, "series": r.series_uid, "instance": r.sop_uid, "stored": r.stored} for r in results],
    )
