"""SQLite's planner statistics are refreshed as the archive grows, not only every ten minutes: with statistics of a
much smaller index, SQLite reads a whole table in result order instead of using a filter's index."""

from __future__ import annotations

from sqlalchemy import text

from dicomhub.blobs.base import Staged
from dicomhub.config import Settings
from dicomhub.domain import cleanup
from dicomhub.services import build_services
from tests.factory import make_instance, new_uid


def studies_in_statistics(services) -> int:
    with services.index.read() as conn:
        row = conn.execute(text("SELECT stat FROM sqlite_stat1 WHERE idx = 'ix_study_partition_key_watermark'")).first()
    return int(row[0].split()[0]) if row else 0


def store(services, count: int) -> None:
    partition = services.index.ensure_partition("Microsoft.Default")
    files = [Staged(data=bytearray(make_instance(study=new_uid()))) for _ in range(count)]
    assert all(r.stored for r in services.store.store_many(partition, files, 2, None))


def test_statistics_follow_growth(tmp_path, monkeypatch):
    monkeypatch.setattr(cleanup, "STATISTICS_MIN_GROWTH", 10)
    services = build_services(Settings(data_dir=tmp_path))
    store(services, 12)
    services.cleanup.run_once()  # the first pass always refreshes
    assert studies_in_statistics(services) == 12
    store(services, 4)  # +33 %: not yet
    services.cleanup.run_once()
    assert studies_in_statistics(services) == 12
    store(services, 8)  # 24 in all, twice the 12 of the last refresh
    services.cleanup.run_once()
    assert studies_in_statistics(services) == 24
