"""Bulk update in the index: the instances of a study, the reservation of new versions, and the one transaction
that makes a batch of new versions current.

An instance keeps at most two versions: the original (as first stored) and the latest. The instance row points at
the latest; ``original_*`` columns hold the original once the instance has been updated. A new version's file is
written under a fresh watermark whose key is first queued in ``blob_cleanup`` (a reservation): if the process dies
before the commit, the cleanup removes the orphan; the commit takes the reservation back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, case, delete, func, insert, select, update

from dicomhub.index.changefeed import Change, append_changes
from dicomhub.index.records import IndexValues
from dicomhub.index.repository import Index
from dicomhub.index.schema import (
    CHANGE_UPDATE,
    INSTANCE_CREATED,
    NAME_PATIENT,
    NAME_REFERRING_PHYSICIAN,
    blob_cleanup,
    instance,
    instance_metadata,
    name_word,
    series,
    study,
    watermark_allocator,
)


@dataclass(frozen=True)
class UpdateCandidate:
    """An instance of a study to update, as its row stood when the task listed it."""

    instance_key: int
    watermark: int
    study_key: int
    series_key: int
    series_uid: str
    sop_uid: str
    blob_key: str
    file_size: int
    transfer_syntax_uid: str
    frame_count: int
    original_watermark: int | None
    updated_by: str | None
    partition_key: int


@dataclass(frozen=True)
class Reservation:
    watermark: int
    blob_key: str
    cleanup_id: int


@dataclass
class NewVersion:
    """A durable file of a new version and what the index records about it."""

    candidate: UpdateCandidate
    reservation: Reservation
    file_size: int
    frames_json: str | None
    metadata_json: str
    values: IndexValues


def _newer(column, watermark):
    """The larger of a row's watermark and a new one (a concurrent store may have gone further meanwhile)."""
    return case((column > watermark, column), else_=watermark)


class UpdateIndex:
    def __init__(self, index: Index) -> None:
        self.index = index

    def _write(self):
        return self.index.engine.connect().execution_options(write=True, durable=True)

    def study_instances(self, partition_key: int, study_uid: str) -> list[UpdateCandidate]:
        with self.index.read() as conn:
            rows = conn.execute(
                select(
                    instance.c.instance_key,
                    instance.c.watermark,
                    instance.c.study_key,
                    instance.c.series_key,
                    instance.c.series_uid,
                    instance.c.sop_uid,
                    instance.c.blob_key,
                    instance.c.file_size,
                    instance.c.transfer_syntax_uid,
                    instance.c.frame_count,
                    instance.c.original_watermark,
                    instance.c.updated_by,
                    instance.c.partition_key,
                )
                .where(
                    (instance.c.partition_key == partition_key)
                    & (instance.c.study_uid == study_uid)
                    & (instance.c.status == INSTANCE_CREATED)
                )
                .order_by(instance.c.watermark)
            ).all()
        return [UpdateCandidate(*row) for row in rows]

    def documents(self, watermarks: Sequence[int]) -> dict[int, str]:
        """The stored DICOM JSON of each version."""
        with self.index.read() as conn:
            rows = conn.execute(
                select(instance_metadata.c.watermark, instance_metadata.c.json).where(
                    instance_metadata.c.watermark.in_(list(watermarks))
                )
            ).all()
        return {r.watermark: r.json for r in rows}

    def reserve(self, count: int, key_of: Callable[[int, int], str], hold: timedelta) -> list[Reservation]:
        """Allocates ``count`` watermarks and queues the key of each (``key_of(position, watermark)``) for deletion
        after ``hold``, durably, before any file is written under it."""
        delete_after = datetime.now(UTC) + hold
        reservations = []
        with self._write() as conn, conn.begin():
            for position in range(count):
                watermark = conn.execute(
                    insert(watermark_allocator).returning(watermark_allocator.c.watermark)
                ).scalar_one()
                key = key_of(position, watermark)
                cleanup_id = conn.execute(
                    insert(blob_cleanup)
                    .values(blob_key=key, delete_after=delete_after, attempts=0)
                    .returning(blob_cleanup.c.id)
                ).scalar_one()
                reservations.append(Reservation(watermark, key, cleanup_id))
        return reservations

    def commit(
        self,
        partition_key: int,
        study_uid: str,
        operation_id: str,
        versions: Sequence[NewVersion],
        names_changed: tuple[bool, bool],
        replaced_delay: timedelta,
        extra: Callable[[Connection, list[NewVersion]], None] | None = None,
    ) -> int:
        """Makes the new versions current in one durable transaction; returns how many were committed.

        An instance whose row moved on since it was listed (deleted, or updated by a worker that took the task over)
        is skipped; its new file stays queued for cleanup. A version replacing an intermediate one (the instance was
        updated before) drops that one's metadata and queues its file: only the original and the latest are kept.
        ``names_changed`` tells whether the patient's and the referring physician's name words are replaced.
        ``extra`` runs in the transaction with the committed versions (extended query tag values).
        """
        committed: list[NewVersion] = []
        now = datetime.now(UTC)
        with self._write() as conn, conn.begin():
            for version in versions:
                old, new = version.candidate, version.reservation
                moved = conn.execute(
                    update(instance)
                    .where(
                        (instance.c.instance_key == old.instance_key)
                        & (instance.c.watermark == old.watermark)
                        & (instance.c.status == INSTANCE_CREATED)
                    )
                    .values(
                        watermark=new.watermark,
                        blob_key=new.blob_key,
                        file_size=version.file_size,
                        frames=version.frames_json,
                        updated_by=operation_id,
                        original_watermark=func.coalesce(instance.c.original_watermark, old.watermark),
                        original_blob_key=func.coalesce(instance.c.original_blob_key, old.blob_key),
                        original_file_size=func.coalesce(instance.c.original_file_size, old.file_size),
                    )
                ).rowcount
                if moved != 1:
                    continue
                taken = conn.execute(delete(blob_cleanup).where(blob_cleanup.c.id == new.cleanup_id)).rowcount
                if taken != 1:  # the cleanup outran a very slow task: the file may be gone, so nothing is committed
                    raise RuntimeError(f"the reservation of {new.blob_key} expired before its commit")
                if old.original_watermark is not None:
                    conn.execute(delete(instance_metadata).where(instance_metadata.c.watermark == old.watermark))
                    conn.execute(
                        insert(blob_cleanup).values(
                            blob_key=old.blob_key, delete_after=now + replaced_delay, attempts=0
                        )
                    )
                conn.execute(insert(instance_metadata).values(watermark=new.watermark, json=version.metadata_json))
                self._refresh_levels(conn, version)
                committed.append(version)
            if committed:
                if extra is not None:
                    extra(conn, committed)
                self._replace_words(conn, committed[-1], names_changed)
                append_changes(  # last: it holds the feed's append lock until the commit
                    conn,
                    [
                        Change(
                            CHANGE_UPDATE,
                            partition_key,
                            study_uid,
                            v.candidate.series_uid,
                            v.candidate.sop_uid,
                            v.reservation.watermark,
                            v.reservation.watermark,
                        )
                        for v in committed
                    ],
                )
        return len(committed)

    @staticmethod
    def _refresh_levels(conn: Connection, version: NewVersion) -> None:
        """Study and series rows take the new version's non-empty values and point at it (QIDO answers from the
        metadata of the watermark they hold), as a store of a newer instance would."""
        watermark = version.reservation.watermark
        for table, key_col, key, values in (
            (study, study.c.study_key, version.candidate.study_key, version.values.study),
            (series, series.c.series_key, version.candidate.series_key, version.values.series),
        ):
            columns = {name: value for name, value in values.items() if value is not None}  # empty: keep
            conn.execute(
                update(table).where(key_col == key).values(watermark=_newer(table.c.watermark, watermark), **columns)
            )

    @staticmethod
    def _replace_words(conn: Connection, version: NewVersion, names_changed: tuple[bool, bool]) -> None:
        """Old name words must stop matching fuzzy searches: the changed names' words are replaced."""
        study_key = version.candidate.study_key
        for changed, attribute, words in zip(
            names_changed,
            (NAME_PATIENT, NAME_REFERRING_PHYSICIAN),
            (version.values.patient_name_words, version.values.referring_physician_words),
            strict=True,
        ):
            if not changed:
                continue
            conn.execute(
                delete(name_word).where((name_word.c.study_key == study_key) & (name_word.c.attribute == attribute))
            )
            unique = sorted({w[:64] for w in words})
            if unique:
                conn.execute(
                    insert(name_word), [{"study_key": study_key, "attribute": attribute, "word": w} for w in unique]
                )
