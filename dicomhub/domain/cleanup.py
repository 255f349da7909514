"""Background housekeeping: delete files of deleted instances, roll back stores a crash left unfinished, and keep
the index's planner statistics current."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.domain.store import blob_key
from dicomhub.index.repository import Index
from dicomhub.index.statistics import instance_high_water

log = logging.getLogger(__name__)
RETRY_AFTER = timedelta(minutes=5)
# An upload's spool file is written to as the body arrives; one untouched this long belongs to a dead request.
STAGING_MAX_IDLE = timedelta(hours=1)
STATISTICS_EVERY = timedelta(minutes=10)
# ... and sooner once the archive has grown by half since the last refresh (by at least this many instances): SQLite
# plans with statistics of a much smaller index read a whole table in result order instead of using a filter's index
STATISTICS_GROWTH = 0.5
STATISTICS_MIN_GROWTH = 1000


class CleanupService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings
        self._statistics_at: datetime | None = None
        self._statistics_size = 0

    def run_once(self, batch: int = 100) -> int:
        """One pass; returns how many files and stale rows it removed.

        Due files are taken in batches until none is left, so a large delete does not wait one interval per batch.
        A file that cannot be deleted (whatever the error) is rescheduled; it never blocks the ones behind it.
        """
        done = 0
        while True:
            due = self.index.due_blob_cleanups(batch)
            for cleanup_id, key in due:
                try:
                    self.blobs.delete(key)
                except Exception:
                    log.warning("blob delete failed; will retry", extra={"blob_key": key}, exc_info=True)
                    self.index.retry_blob_cleanup(cleanup_id, RETRY_AFTER)
                    continue
                self.index.finish_blob_cleanups([cleanup_id])
                done += 1
            if len(due) < batch:
                break
        now = datetime.now(UTC)
        size = instance_high_water(self.index)
        grown = size - self._statistics_size >= max(STATISTICS_MIN_GROWTH, self._statistics_size * STATISTICS_GROWTH)
        if self._statistics_at is None or now - self._statistics_at >= STATISTICS_EVERY or grown:
            self.index.refresh_statistics()
            self._statistics_at, self._statistics_size = now, size
        stale_before = now - timedelta(seconds=self.settings.stale_create_seconds)
        done += self.blobs.purge_staging(STAGING_MAX_IDLE.total_seconds())
        return done + self.rollback_unfinished_stores(stale_before)

    def rollback_unfinished_stores(self, started_before: datetime) -> int:
        """Removes ``creating`` rows (and any file they wrote) older than ``started_before``.

        The embedded server calls it at start-up with "now": no other process can be mid-store then.
        """
        pending = self.index.stale_creates(started_before)
        for row in pending:
            self.blobs.delete(blob_key(row.partition_key, row.study_uid, row.series_uid, row.sop_uid, row.watermark))
            self.index.abort_creates([row.watermark])
        return len(pending)
