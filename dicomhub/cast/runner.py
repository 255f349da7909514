"""The DICOMcast loop: read the entries after the cursor, cast each one, then move the cursor past it.

The cursor moves only after an entry's FHIR writes succeeded, so a crash repeats at most the entry under way (its
writes are idempotent). A transient failure ends the pass and the same entry is tried again after a back-off; an
entry that fails for any other reason is recorded with the error and passed over, so the feed never sticks. One
runner holds the lease at a time; a heartbeat renews it while an entry takes long.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from dicomhub.cast.fhir import MAX_BACKOFF_SECONDS, FhirClient, TransientError, credentials
from dicomhub.cast.source import Entry, LocalSource, RemoteSource, Source
from dicomhub.cast.state import CastState, FileCastState
from dicomhub.cast.writer import FhirWriter
from dicomhub.config import Settings
from dicomhub.domain.changefeed import ChangeFeedService
from dicomhub.index.cast import CastFailure
from dicomhub.services import Services, build_services

log = logging.getLogger("dicomhub.cast")

LOCAL_CAST = "local"
CALL_RETRY_SECONDS = 20.0  # how long one request is retried before the pass ends (and starts again after a wait)
DEFAULT_PUBLIC_BASE = "http://127.0.0.1:8080/v2"  # where `dicomhub serve` listens by default
CURSOR = Gauge("dicomhub_cast_cursor", "DICOMcast: last change-feed sequence cast", multiprocess_mode="livemax")
LAG_ENTRIES = Gauge("dicomhub_cast_lag_entries", "DICOMcast: sequences not cast yet", multiprocess_mode="livemax")
LAG_SECONDS = Gauge(
    "dicomhub_cast_lag_seconds", "DICOMcast: age of the oldest entry not cast yet", multiprocess_mode="livemax"
)
FAILURES = Gauge("dicomhub_cast_failures", "DICOMcast: entries skipped or cast partially", multiprocess_mode="livemax")


def _failure(entry, outcome: str, reason: str) -> CastFailure:
    return CastFailure(
        entry.sequence,
        entry.action,
        entry.partition_name,
        entry.study_uid,
        entry.series_uid,
        entry.sop_uid,
        outcome,
        reason,
    )


class CastRunner:
    def __init__(
        self, source: Source, state: CastState, writer: FhirWriter, poll_seconds: float, lease_seconds: float
    ) -> None:
        self.source = source
        self.state = state
        self.writer = writer
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Follows the feed until ``stop`` is set."""
        heartbeat = threading.Thread(target=self._renew, args=(stop,), name="cast-lease", daemon=True)
        heartbeat.start()
        backoff = self.poll_seconds
        try:
            while not stop.is_set():
                if not self._held.is_set():
                    if not self.state.acquire(self.owner):
                        stop.wait(self.poll_seconds)
                        continue
                    self._held.set()
                    log.info("DICOMcast runner holds the lease", extra={"owner": self.owner})
                try:
                    cast = self.run_pass(stop)
                    self._report()
                except TransientError as exc:
                    log.warning("DICOMcast waits for a transient failure", extra={"problem": str(exc)})
                    stop.wait(max(backoff, exc.wait))
                    backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                    continue
                except Exception:
                    log.exception("DICOMcast pass failed")
                    stop.wait(self.poll_seconds)
                    continue
                backoff = self.poll_seconds
                if not cast:
                    stop.wait(self.poll_seconds)
        finally:
            self._held.clear()
            self.state.release(self.owner)
            heartbeat.join(5)

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            if self._held.is_set():
                try:
                    if not self.state.acquire(self.owner):
                        self._held.clear()
                except Exception:
                    log.exception("DICOMcast could not renew its lease")

    def run_pass(self, stop: threading.Event) -> int:
        """Casts one page of entries after the cursor; returns how many it went through."""
        cursor = self.state.cursor()
        page = self.source.read(cursor)
        done = 0
        for batch in self.writer.batches(page.entries):
            if stop.is_set() or not self._held.is_set():
                break
            failures = self._cast(batch)
            if not self.state.advance(self.owner, batch[-1].sequence, failures):
                self._held.clear()  # another runner took over
                log.warning("DICOMcast lost its lease", extra={"owner": self.owner})
                break
            done += len(batch)
        if not page.entries and page.scanned_to > cursor:
            self.state.advance(self.owner, page.scanned_to)
        return done

    def _cast(self, batch: list[Entry]) -> list[CastFailure]:
        """The failures of a batch of entries cast together; when the batch fails as a whole, its entries are
        cast one by one, so the failing one is named and the others go through."""
        try:
            problems = self.writer.apply(batch, self.source.partition_base(batch[0].partition_name))
        except TransientError:
            raise
        except Exception as exc:  # refused by FHIR, a required attribute missing, or a defect: never a stuck feed
            if len(batch) > 1:
                return [failure for entry in batch for failure in self._cast([entry])]
            entry = batch[0]
            log.warning(
                "DICOMcast skipped an entry", extra={"sequence": entry.sequence, "reason": f"{exc}"}, exc_info=True
            )
            return [_failure(entry, "skipped", f"{type(exc).__name__}: {exc}")]
        return [_failure(entry, "partial", p) for entry, found in zip(batch, problems, strict=True) for p in found]

    def status(self) -> dict[str, Any]:
        """The cursor, the lag behind the feed, and the entries skipped or cast without an invalid attribute."""
        cursor = self.state.cursor()
        position = self.source.position(cursor)
        oldest = position.next_timestamp
        failures = self.state.failures()
        return {
            "cursor": cursor,
            "latestSequence": position.latest_sequence,
            "lagEntries": max(position.latest_sequence - cursor, 0),
            "lagSeconds": round((datetime.now(UTC) - oldest).total_seconds(), 3) if oldest else 0.0,
            "failures": [
                {
                    "sequence": f.sequence,
                    "action": f.action,
                    "partitionName": f.partition_name,
                    "studyInstanceUid": f.study_uid,
                    "seriesInstanceUid": f.series_uid,
                    "sopInstanceUid": f.sop_uid,
                    "outcome": f.outcome,
                    "reason": f.reason,
                    "recorded": f.created_at.isoformat() if f.created_at else None,
                }
                for f in failures
            ],
        }

    def _report(self) -> None:
        status = self.status()
        CURSOR.set(status["cursor"])
        LAG_ENTRIES.set(status["lagEntries"])
        LAG_SECONDS.set(status["lagSeconds"])
        FAILURES.set(len(status["failures"]))


def build_runner(settings: Settings, dicomweb_url: str | None = None, services: Services | None = None) -> CastRunner:
    """The runner of these settings: following the local index (``services``, built if not given), or the remote
    archive at ``dicomweb_url`` with its state in a file."""
    if not settings.cast_fhir_url:
        raise ValueError("DICOMHUB_CAST_FHIR_URL is not set: DICOMcast needs the base URL of a FHIR server")
    retry_seconds = CALL_RETRY_SECONDS
    fhir_auth = credentials(
        settings.cast_fhir_token_url,
        settings.cast_fhir_client_id,
        settings.cast_fhir_client_secret,
        settings.cast_fhir_scope,
    )
    writer = FhirWriter(
        FhirClient(settings.cast_fhir_url, fhir_auth, retry_seconds, settings.cast_fhir_timeout_seconds),
        settings.cast_patient_system,
        settings.cast_use_issuer,
        settings.cast_observations,
    )
    source: Source
    state: CastState
    if dicomweb_url:
        archive_auth = credentials(
            settings.cast_dicomweb_token_url,
            settings.cast_dicomweb_client_id,
            settings.cast_dicomweb_client_secret,
            settings.cast_dicomweb_scope,
        )
        source = RemoteSource(dicomweb_url, settings.cast_dicomweb_url, archive_auth, retry_seconds)
        state = FileCastState(Path(settings.cast_state_file or settings.data_dir / "cast-state.json"))
    else:
        services = services or build_services(settings)
        source = LocalSource(
            ChangeFeedService(services.index),
            settings.cast_dicomweb_url or DEFAULT_PUBLIC_BASE,
            settings.enable_partitions,
        )
        state = services.cast_state(LOCAL_CAST, settings.cast_lease_seconds)
    return CastRunner(source, state, writer, settings.cast_poll_seconds, settings.cast_lease_seconds)
