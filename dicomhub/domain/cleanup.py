"""Background housekeeping: delete files of deleted instances and roll back stores a crash left unfinished."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.domain.store import blob_key
from dicomhub.index.repository import Index

log = logging.getLogger(__name__)
RETRY_AFTER = timedelta(minutes=5)


class CleanupService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings

    def run_once(self) -> int:
        """One pass; returns how many files and stale rows it removed."""
        done = 0
        for cleanup_id, key in self.index.due_blob_cleanups():
            try:
                self.blobs.delete(key)
            except OSError:
                log.warning("blob delete failed; will retry", extra={"blob_key": key})
                self.index.retry_blob_cleanup(cleanup_id, RETRY_AFTER)
                continue
            self.index.finish_blob_cleanups([cleanup_id])
            done += 1
        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.stale_create_seconds)
        return done + self.rollback_unfinished_stores(stale_before)

    def rollback_unfinished_stores(self, started_before: datetime) -> int:
        """Removes ``creating`` rows (and any file they wrote) older than ``started_before``.

        The embedded server calls it at start-up with "now": no other process can be mid-store then.
        """
        pending = self.index.stale_creates(started_before)
        for row in pending:
            self.blobs.delete(blob_key(row.partition_key, row.study_uid, row.series_uid, row.sop_uid, row.watermark))
            self.index.abort_create(row.watermark)
        return len(pending)
