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

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update

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


# Built once with bind parameters: per-call construction costs more than running them.
_ALLOCATE = insert(watermark_allocator).returning(watermark_allocator.c.watermark)
_RESERVE = insert(blob_cleanup).returning(blob_cleanup.c.id)
# a reservation is taken back only while it is not due: a cleanup pass that could be deleting its file has seen it due
_TAKE_BACK = delete(blob_cleanup).where(
    (blob_cleanup.c.id == bindparam("b_id")) & (blob_cleanup.c.delete_after > bindparam("b_safe"))
)
_MOVE = (
    update(instance)
    .where(
        (instance.c.instance_key == bindparam("b_key"))
        & (instance.c.watermark == bindparam("b_old"))
        & (instance.c.status == INSTANCE_CREATED)
    )
    .values(
        watermark=bindparam("b_new"),
        blob_key=bindparam("b_blob_key"),
        file_size=bindparam("b_file_size"),
        frames=bindparam("b_frames"),
        updated_by=bindparam("b_operation"),
        original_watermark=func.coalesce(instance.c.original_watermark, bindparam("b_old")),
        original_blob_key=func.coalesce(instance.c.original_blob_key, bindparam("b_old_blob_key")),
        original_file_size=func.coalesce(instance.c.original_file_size, bindparam("b_old_file_size")),
    )
)


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
                watermark = conn.execute(_ALLOCATE).scalar_one()
                key = key_of(position, watermark)
                row = {"blob_key": key, "delete_after": delete_after, "attempts": 0}
                reservations.append(Reservation(watermark, key, conn.execute(_RESERVE, row).scalar_one()))
        return reservations

    def commit(
        self,
        partition_key: int,
        study_uid: str,
        operation_id: str,
        versions: Sequence[NewVersion],
        names_changed: tuple[bool, bool],
        replaced_delay: timedelta,
        margin: timedelta,
        extra: Callable[[Connection, list[NewVersion]], None] | None = None,
    ) -> int:
        """Makes the new versions current in one durable transaction; returns how many were committed.

        An instance whose row moved on since it was listed (deleted, or updated by a worker that took the task over)
        is skipped; its new file stays queued for cleanup. A version replacing an intermediate one (the instance was
        updated before) drops that one's metadata and queues its file: only the original and the latest are kept.
        ``names_changed`` tells whether the patient's and the referring physician's name words are replaced.
        A reservation due within ``margin`` (clock differences between processes) fails the whole commit: the cleanup
        may be removing its file.
        ``extra`` runs in the transaction with the committed versions (extended query tag values).
        """
        committed: list[NewVersion] = []
        replaced: list[UpdateCandidate] = []
        with self._write() as conn, conn.begin():
            safe = datetime.now(UTC) + margin
            for version in versions:
                old, new = version.candidate, version.reservation
                moved = conn.execute(
                    _MOVE,
                    {
                        "b_key": old.instance_key,
                        "b_old": old.watermark,
                        "b_new": new.watermark,
                        "b_blob_key": new.blob_key,
                        "b_file_size": version.file_size,
                        "b_frames": version.frames_json,
                        "b_operation": operation_id,
                        "b_old_blob_key": old.blob_key,
                        "b_old_file_size": old.file_size,
                    },
                ).rowcount
                if moved != 1:
                    continue
                if conn.execute(_TAKE_BACK, {"b_id": new.cleanup_id, "b_safe": safe}).rowcount != 1:
                    raise RuntimeError(f"the reservation of {new.blob_key} expired before its commit")
                if old.original_watermark is not None:
                    replaced.append(old)
                committed.append(version)
            if replaced:
                watermarks = [r.watermark for r in replaced]
                conn.execute(delete(instance_metadata).where(instance_metadata.c.watermark.in_(watermarks)))
                delete_after = datetime.now(UTC) + replaced_delay
                conn.execute(
                    insert(blob_cleanup),
                    [{"blob_key": r.blob_key, "delete_after": delete_after, "attempts": 0} for r in replaced],
                )
            if committed:
                conn.execute(
                    insert(instance_metadata),
                    [{"watermark": v.reservation.watermark, "json": v.metadata_json} for v in committed],
                )
                self._refresh_levels(conn, committed)
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
    def _refresh_levels(conn: Connection, versions: list[NewVersion]) -> None:
        """Study and series rows take the newest version's non-empty values and point at it (QIDO answers from the
        metadata of the watermark they hold), as a store of a newer instance would; once per row and batch."""
        newest: dict[tuple[str, int], NewVersion] = {}
        for version in versions:  # in watermark order: the last one of each row is its newest
            newest[("study", version.candidate.study_key)] = version
            newest[("series", version.candidate.series_key)] = version
        for (level, key), version in newest.items():
            table, key_col = (study, study.c.study_key) if level == "study" else (series, series.c.series_key)
            values = version.values.study if level == "study" else version.values.series
            columns = {name: value for name, value in values.items() if value is not None}  # empty: keep
            watermark = version.reservation.watermark
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
