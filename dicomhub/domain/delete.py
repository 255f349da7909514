"""Delete of a study, series or instance. Files go through a durable cleanup queue, not inline."""

from __future__ import annotations

import json
from datetime import timedelta

from dicomhub.config import Settings
from dicomhub.domain.attributes import indexed_values
from dicomhub.domain.errors import ResourceNotFound
from dicomhub.index.records import IndexValues, Partition
from dicomhub.index.repository import Index


class DeleteService:
    def __init__(self, index: Index, settings: Settings) -> None:
        self.index = index
        self.delay = timedelta(seconds=settings.delete_delay_seconds)

    def delete(self, partition: Partition, study: str, series: str | None = None, sop: str | None = None) -> int:
        count = self.index.delete(partition.key, study, series, sop, self.delay, _reindex)
        if not count:
            raise ResourceNotFound.scope(series, sop)
        return count


def _reindex(document: str) -> IndexValues:
    return indexed_values(json.loads(document))[0]
