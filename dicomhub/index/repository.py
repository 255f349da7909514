"""The index: every read and write of archive state goes through :class:`Index`.

Writes that change what clients see (instance created, instances deleted) happen in one transaction together with
their change-feed rows, so the feed and the index never disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, Select, bindparam, case, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from dicomhub.index.changefeed import Change, append_changes
from dicomhub.index.engine import Prepared, in_lists, read_transaction, utc_now, write_transaction
from dicomhub.index.extended_tags import forget_deleted
from dicomhub.index.records import IndexValues, NewInstance, Partition, PendingCreate, StoredInstance
from dicomhub.index.schema import (
    CHANGE_CREATE,
    CHANGE_DELETE,
    INSTANCE_CREATED,
    INSTANCE_CREATING,
    NAME_PATIENT,
    NAME_REFERRING_PHYSICIAN,
    blob_cleanup,
    instance,
    instance_metadata,
    name_word,
    partition,
    series,
    study,
    watermark_allocator,
)

# Store time, inside the commit: indexes extended query tags of (instance, study key, series key, instance key) each.
ExtendedIndexer = Callable[[Connection, list[tuple[NewInstance, int, int, int]]], None]
# Study and series columns that count created instances (and a study's series): changed by increments only.
COUNT_COLUMNS = {"instance_count", "series_count"}


class InstanceExists(Exception):
    """A row for these UIDs exists already; ``creating`` tells whether another store is still writing it."""

    def __init__(self, creating: bool) -> None:
        super().__init__("instance exists")
        self.creating = creating


class ReservationLost(Exception):
    """A store's ``creating`` row is gone (taken over as stale): it must not be completed."""


class Index:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._partitions: dict[str, Partition] = {}
        self._prepare_store_statements()
        self._prepare_read_statements()

    # -- transactions -------------------------------------------------------------------------------------------
    def _write(self, durable: bool = True) -> AbstractContextManager[Connection]:
        return write_transaction(self.engine, durable)

    def read(self) -> AbstractContextManager[Connection]:
        return read_transaction(self.engine)

    def _greatest(self, a, b):
        return func.greatest(a, b) if self.dialect == "postgresql" else func.max(a, b)

    def refresh_statistics(self) -> None:
        """SQLite: gathers the statistics its planner needs to prefer a selective filter index over reading in
        result order (PostgreSQL's autovacuum does this by itself). ``analysis_limit`` keeps it quick on big tables."""
        if self.dialect != "sqlite":
            return
        with self._write(durable=False) as conn:
            conn.exec_driver_sql("PRAGMA analysis_limit=1000")
            conn.exec_driver_sql("ANALYZE")

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    # -- partitions ---------------------------------------------------------------------------------------------
    def get_partition(self, name: str) -> Partition | None:
        cached = self._partitions.get(name)
        if cached:
            return cached
        with self.read() as conn:
            row = conn.execute(select(partition).where(partition.c.name == name)).first()
        if row is None:
            return None
        found = Partition(row.partition_key, row.name, row.created_at)
        self._partitions[name] = found
        return found

    def ensure_partition(self, name: str) -> Partition:
        existing = self.get_partition(name)
        if existing:
            return existing
        with self._write() as conn:
            stmt = self._insert(partition).values(name=name, created_at=utc_now()).on_conflict_do_nothing()
            conn.execute(stmt)
        found = self.get_partition(name)
        assert found is not None
        return found

    def list_partitions(self) -> list[Partition]:
        with self.read() as conn:
            rows = conn.execute(select(partition).order_by(partition.c.partition_key)).all()
        return [Partition(r.partition_key, r.name, r.created_at) for r in rows]

    # -- store --------------------------------------------------------------------------------------------------
    def _prepare_store_statements(self) -> None:
        """Built once: per-call construction of upserts costs more than executing them. The statements every store
        runs are :class:`Prepared` (compiled once, run on the driver's cursor); the rare ones stay Core."""
        self._allocate = Prepared(insert(watermark_allocator).returning(watermark_allocator.c.watermark))
        self._reserve = Prepared(
            self._insert(instance)
            .on_conflict_do_nothing(index_elements=["partition_key", "study_uid", "series_uid", "sop_uid"])
            .returning(instance.c.watermark)
        )
        self._existing = select(instance.c.status, instance.c.created_at).where(
            (instance.c.partition_key == bindparam("b_partition"))
            & (instance.c.study_uid == bindparam("b_study"))
            & (instance.c.series_uid == bindparam("b_series"))
            & (instance.c.sop_uid == bindparam("b_sop"))
        )
        self._take_over = delete(instance).where(
            (instance.c.partition_key == bindparam("b_partition"))
            & (instance.c.study_uid == bindparam("b_study"))
            & (instance.c.series_uid == bindparam("b_series"))
            & (instance.c.sop_uid == bindparam("b_sop"))
            & (instance.c.status == INSTANCE_CREATING)
        )
        self._upsert_study = Prepared(self._level_upsert(study, ["partition_key", "study_uid"], study.c.study_key))
        self._upsert_series = Prepared(self._level_upsert(series, ["study_key", "series_uid"], series.c.series_key))
        self._count_new_series = Prepared(
            update(study)
            .where(study.c.study_key == bindparam("b_study_key"))
            .values(series_count=study.c.series_count + 1)
        )
        self._mark_created = Prepared(
            update(instance)
            .where((instance.c.watermark == bindparam("b_watermark")) & (instance.c.status == INSTANCE_CREATING))
            .values(
                status=INSTANCE_CREATED,
                study_key=bindparam("b_study_key"),
                series_key=bindparam("b_series_key"),
                sop_class_uid=bindparam("b_sop_class_uid"),
                transfer_syntax_uid=bindparam("b_transfer_syntax_uid"),
                blob_key=bindparam("b_blob_key"),
                file_size=bindparam("b_file_size"),
                frame_count=bindparam("b_frame_count"),
                frames=bindparam("b_frames"),
            )
            .returning(instance.c.instance_key)
        )
        self._add_words = Prepared(self._insert(name_word).on_conflict_do_nothing())
        self._add_metadata = Prepared(insert(instance_metadata))

    def _level_upsert(self, table, conflict: list[str], key_col):
        """Insert-or-update of a study or series row for one more instance: the newest instance's non-empty values
        win and the row counts the instance. Returns the key and the row's instance count.

        The row stays locked to the commit, so the stores of one study take turns from here on and counts are
        exact (PostgreSQL: the increment applies to the row as the previous store committed it)."""
        stmt = self._insert(table)
        keep = set(conflict) | {"partition_key", "watermark", key_col.name} | COUNT_COLUMNS
        updates = {c.name: func.coalesce(stmt.excluded[c.name], c) for c in table.c if c.name not in keep}
        updates["watermark"] = self._greatest(table.c.watermark, stmt.excluded.watermark)
        updates["instance_count"] = table.c.instance_count + 1
        conflict_update = stmt.on_conflict_do_update(index_elements=conflict, set_=updates)
        return conflict_update.returning(key_col, table.c.instance_count)

    def begin_creates(
        self, partition_key: int, uids: Sequence[tuple[str, str, str]], stale_before: datetime
    ) -> list[int | InstanceExists]:
        """Reserves each (study, series, SOP) with a ``creating`` row; returns its new watermark, or
        :class:`InstanceExists` when the instance exists or another store is writing it.

        A ``creating`` row older than ``stale_before`` was left by a crashed process and is taken over. Not durable
        on purpose: losing a reservation in a crash loses nothing acknowledged.
        """
        results: list[int | InstanceExists] = []
        with self._write(durable=False) as conn:
            for study_uid, series_uid, sop_uid in uids:
                keys = {"b_partition": partition_key, "b_study": study_uid, "b_series": series_uid, "b_sop": sop_uid}
                row = {
                    "partition_key": partition_key,
                    "study_uid": study_uid,
                    "series_uid": series_uid,
                    "sop_uid": sop_uid,
                    "status": INSTANCE_CREATING,
                    "created_at": utc_now(),
                }
                ((watermark,),) = self._allocate.rows(conn)
                reserved = self._reserve.rows(conn, {**row, "watermark": watermark})
                if not reserved:
                    existing = conn.execute(self._existing, keys).first()
                    if (
                        existing is not None
                        and existing.status == INSTANCE_CREATING
                        and (existing.created_at < stale_before)
                    ):
                        conn.execute(self._take_over, keys)
                        reserved = self._reserve.rows(conn, {**row, "watermark": watermark})
                    if not reserved:
                        creating = existing is None or existing.status == INSTANCE_CREATING
                        results.append(InstanceExists(creating=creating))
                        continue
                results.append(watermark)
        return results

    def abort_creates(self, watermarks: Sequence[int]) -> None:
        with self._write() as conn:
            conn.execute(
                delete(instance).where(
                    instance.c.watermark.in_(list(watermarks)) & (instance.c.status == INSTANCE_CREATING)
                )
            )

    def complete_creates(self, news: Sequence[NewInstance], index_extended: ExtendedIndexer | None = None) -> None:
        """Makes instances visible in one durable transaction: study/series rows, instance state, metadata, name
        words, extended query tag values (``index_extended``) and change-feed entries."""
        if not news:
            return
        with self._write() as conn:
            created: list[tuple[NewInstance, int, int, int]] = []
            for new in news:
                ((study_key, _),) = self._upsert_study.rows(
                    conn,
                    {
                        "partition_key": new.partition_key,
                        "study_uid": new.study_uid,
                        "watermark": new.watermark,
                        "instance_count": 1,
                        "series_count": 0,
                        **new.values.study,
                    },
                )
                ((series_key, series_instances),) = self._upsert_series.rows(
                    conn,
                    {
                        "partition_key": new.partition_key,
                        "study_key": study_key,
                        "series_uid": new.series_uid,
                        "watermark": new.watermark,
                        "instance_count": 1,
                        **new.values.series,
                    },
                )
                if series_instances == 1:  # the series' first instance: the study has one series more
                    self._count_new_series.rows(conn, {"b_study_key": study_key})
                marked = self._mark_created.rows(
                    conn,
                    {
                        "b_watermark": new.watermark,
                        "b_study_key": study_key,
                        "b_series_key": series_key,
                        "b_sop_class_uid": new.sop_class_uid,
                        "b_transfer_syntax_uid": new.transfer_syntax_uid,
                        "b_blob_key": new.blob_key,
                        "b_file_size": new.file_size,
                        "b_frame_count": new.frame_count,
                        "b_frames": new.frames_json,
                    },
                )
                if not marked:
                    raise ReservationLost(f"the reservation of watermark {new.watermark} was rolled back meanwhile")
                created.append((new, study_key, series_key, marked[0][0]))
                words = [(NAME_PATIENT, w) for w in new.values.patient_name_words] + [
                    (NAME_REFERRING_PHYSICIAN, w) for w in new.values.referring_physician_words
                ]
                self._add_words.run_many(
                    conn, [{"study_key": study_key, "attribute": a, "word": w[:64]} for a, w in words]
                )
            self._add_metadata.run_many(conn, [{"watermark": n.watermark, "json": n.metadata_json} for n in news])
            if index_extended is not None:
                index_extended(conn, created)
            changes = [(n.partition_key, n.study_uid, n.series_uid, n.sop_uid, n.watermark, n.watermark) for n in news]
            append_changes(conn, [Change(CHANGE_CREATE, *c) for c in changes])  # last: holds a lock until the commit

    def stale_creates(self, before: datetime) -> list[PendingCreate]:
        with self.read() as conn:
            rows = conn.execute(
                select(
                    instance.c.partition_key,
                    instance.c.study_uid,
                    instance.c.series_uid,
                    instance.c.sop_uid,
                    instance.c.watermark,
                ).where((instance.c.status == INSTANCE_CREATING) & (instance.c.created_at < before))
            ).all()
        return [PendingCreate(*r) for r in rows]

    # -- retrieve -----------------------------------------------------------------------------------------------
    @staticmethod
    def _scope(partition_key: int, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None):
        cond = (
            (instance.c.partition_key == partition_key)
            & (instance.c.study_uid == study_uid)
            & (instance.c.status == INSTANCE_CREATED)
        )
        if series_uid is not None:
            cond &= instance.c.series_uid == series_uid
        if sop_uid is not None:
            cond &= instance.c.sop_uid == sop_uid
        return cond

    def _prepare_read_statements(self) -> None:
        """One statement per scope (study, series, instance), built once: these run on every WADO request."""
        columns = [
            instance.c.watermark,
            instance.c.study_uid,
            instance.c.series_uid,
            instance.c.sop_uid,
            instance.c.sop_class_uid,
            instance.c.transfer_syntax_uid,
            instance.c.blob_key,
            instance.c.file_size,
            instance.c.frame_count,
            instance.c.frames,
        ]
        # the original version of an updated instance (msdicom-request-original); the same row when never updated.
        # Frame ranges are of the latest file: the original is served whole, never by frames.
        original = {
            "watermark": func.coalesce(instance.c.original_watermark, instance.c.watermark).label("watermark"),
            "blob_key": func.coalesce(instance.c.original_blob_key, instance.c.blob_key).label("blob_key"),
            "file_size": func.coalesce(instance.c.original_file_size, instance.c.file_size).label("file_size"),
            "frames": case((instance.c.original_watermark.is_(None), instance.c.frames)).label("frames"),
        }
        original_columns = [original.get(c.name, c) for c in columns]
        self._find: dict[tuple[bool, bool], Select] = {}
        self._documents: dict[tuple[bool, bool], Select] = {}
        self._find_original: dict[tuple[bool, bool], Select] = {}
        self._documents_original: dict[tuple[bool, bool], Select] = {}
        for series_given, sop_given in ((False, False), (True, False), (True, True)):
            cond = self._scope(
                bindparam("b_partition"),
                bindparam("b_study"),
                bindparam("b_series") if series_given else None,
                bindparam("b_sop") if sop_given else None,
            )
            order = (instance.c.series_uid, instance.c.watermark)
            self._find[series_given, sop_given] = select(*columns).where(cond).order_by(*order)
            self._documents[series_given, sop_given] = (
                select(instance.c.watermark, instance_metadata.c.json)
                .join(instance_metadata, instance_metadata.c.watermark == instance.c.watermark)
                .where(cond)
                .order_by(*order)
            )
            self._find_original[series_given, sop_given] = select(*original_columns).where(cond).order_by(*order)
            self._documents_original[series_given, sop_given] = (
                select(original["watermark"], instance_metadata.c.json)
                .join(instance_metadata, instance_metadata.c.watermark == original["watermark"])
                .where(cond)
                .order_by(*order)
            )

    def _read_scope(self, statements, partition_key: int, study_uid: str, series_uid: str | None, sop_uid: str | None):
        params = {"b_partition": partition_key, "b_study": study_uid, "b_series": series_uid, "b_sop": sop_uid}
        with self.read() as conn:
            return conn.execute(statements[series_uid is not None, sop_uid is not None], params).all()

    def find_instances(
        self,
        partition_key: int,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        original: bool = False,
    ) -> list[StoredInstance]:
        """The instances in scope; ``original``: their versions as first stored (before any bulk update)."""
        statements = self._find_original if original else self._find
        rows = self._read_scope(statements, partition_key, study_uid, series_uid, sop_uid)
        return [StoredInstance(*row) for row in rows]

    def metadata(
        self,
        partition_key: int,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        original: bool = False,
    ) -> list[tuple[int, str]]:
        """(watermark, DICOM JSON) of every instance in the scope (``original``: of the versions first stored)."""
        statements = self._documents_original if original else self._documents
        rows = self._read_scope(statements, partition_key, study_uid, series_uid, sop_uid)
        return [(r.watermark, r.json) for r in rows]

    # -- delete -------------------------------------------------------------------------------------------------
    def delete(
        self,
        partition_key: int,
        study_uid: str,
        series_uid: str | None,
        sop_uid: str | None,
        delete_after: timedelta,
        reindex: Callable[[str], IndexValues],
    ) -> int:
        """Deletes the instances in scope, their empty series/study rows, queues their files; returns the count.

        A study or series that loses its newest instance takes its indexed values from the newest remaining one,
        computed by ``reindex`` from that instance's stored JSON.
        """
        with self._write() as conn:
            victims = conn.execute(
                select(
                    instance.c.watermark,
                    instance.c.instance_key,
                    instance.c.study_key,
                    instance.c.series_key,
                    instance.c.blob_key,
                    instance.c.study_uid,
                    instance.c.series_uid,
                    instance.c.sop_uid,
                    instance.c.original_watermark,
                    instance.c.original_blob_key,
                ).where(self._scope(partition_key, study_uid, series_uid, sop_uid))
            ).all()
            if not victims:
                return 0
            watermarks = [v.watermark for v in victims]
            # an updated instance goes with its original version (metadata and file) too
            originals = [v.original_watermark for v in victims if v.original_watermark is not None]
            removed: list[tuple[int, int]] = []  # (study, series) of each row this transaction deleted
            for chunk in in_lists(watermarks):
                deleted = delete(instance).where(instance.c.watermark.in_(chunk))
                removed += conn.execute(deleted.returning(instance.c.study_key, instance.c.series_key)).tuples().all()
            for chunk in in_lists(watermarks + originals):
                conn.execute(delete(instance_metadata).where(instance_metadata.c.watermark.in_(chunk)))
            now = utc_now()
            keys = [v.blob_key for v in victims] + [v.original_blob_key for v in victims if v.original_blob_key]
            conn.execute(
                insert(blob_cleanup),
                [{"blob_key": key, "delete_after": now + delete_after, "attempts": 0} for key in keys],
            )
            self._uncount(conn, removed)
            for series_key in {v.series_key for v in victims}:
                self._refresh_level(conn, series, series.c.series_key, instance.c.series_key, series_key, reindex)
            for study_key in {v.study_key for v in victims}:
                self._refresh_level(conn, study, study.c.study_key, instance.c.study_key, study_key, reindex)
            forget_deleted(
                conn,
                watermarks,
                [v.instance_key for v in victims],
                list({v.series_key for v in victims}),
                list({v.study_key for v in victims}),
            )
            append_changes(  # last: it holds the feed's append lock until the commit
                conn,
                [
                    Change(CHANGE_DELETE, partition_key, v.study_uid, v.series_uid, v.sop_uid, v.watermark, None)
                    for v in victims
                ],
            )
            return len(victims)

    @staticmethod
    def _uncount(conn: Connection, removed: list[tuple[int, int]]) -> None:
        """Takes deleted instances off their study's and series' counts, and a series left with none off its study's
        series count. Only the rows this transaction deleted count (a concurrent delete of the same instances took
        its own off); studies first, the order a store locks them in."""
        by_study = Counter(study_key for study_key, _ in removed)
        by_series = Counter(removed)
        for study_key, count in by_study.items():
            of_study = update(study).where(study.c.study_key == study_key)
            conn.execute(of_study.values(instance_count=study.c.instance_count - count))
        for (study_key, series_key), count in by_series.items():
            of_series = update(series).where(series.c.series_key == series_key)
            left = conn.execute(
                of_series.values(instance_count=series.c.instance_count - count).returning(series.c.instance_count)
            ).scalar()
            if left == 0:
                of_study = update(study).where(study.c.study_key == study_key)
                conn.execute(of_study.values(series_count=study.c.series_count - 1))

    @staticmethod
    def _refresh_level(conn: Connection, table, key_col, instance_fk, key: int, reindex) -> None:
        """After a delete: drops a study/series row left empty; else, if it lost its newest instance, re-derives its
        indexed values (and, for a study, its name words) from the newest remaining instance."""
        latest = conn.execute(
            select(func.max(instance.c.watermark)).where((instance_fk == key) & (instance.c.status == INSTANCE_CREATED))
        ).scalar()
        if latest is None:
            if table is study:
                conn.execute(delete(name_word).where(name_word.c.study_key == key))
            conn.execute(delete(table).where(key_col == key))
            return
        current = conn.execute(select(table.c.watermark).where(key_col == key)).scalar()
        if current == latest:
            return
        document = conn.execute(
            select(instance_metadata.c.json).where(instance_metadata.c.watermark == latest)
        ).scalar()
        values = reindex(document or "{}")
        columns = values.study if table is study else values.series
        conn.execute(update(table).where(key_col == key).values(watermark=latest, **columns))
        if table is study:
            conn.execute(delete(name_word).where(name_word.c.study_key == key))
            words = [(NAME_PATIENT, w) for w in values.patient_name_words] + [
                (NAME_REFERRING_PHYSICIAN, w) for w in values.referring_physician_words
            ]
            if words:
                conn.execute(insert(name_word), [{"study_key": key, "attribute": a, "word": w[:64]} for a, w in words])

    def due_blob_cleanups(self, limit: int = 100) -> list[tuple[int, str]]:
        with self.read() as conn:
            rows = conn.execute(
                select(blob_cleanup.c.id, blob_cleanup.c.blob_key)
                .where(blob_cleanup.c.delete_after <= utc_now())
                .order_by(blob_cleanup.c.id)
                .limit(limit)
            ).all()
        return [(r.id, r.blob_key) for r in rows]

    def finish_blob_cleanups(self, ids: Sequence[int]) -> None:
        with self._write() as conn:
            conn.execute(delete(blob_cleanup).where(blob_cleanup.c.id.in_(list(ids))))

    def retry_blob_cleanup(self, cleanup_id: int, after: timedelta) -> None:
        with self._write() as conn:
            conn.execute(
                update(blob_cleanup)
                .where(blob_cleanup.c.id == cleanup_id)
                .values(attempts=blob_cleanup.c.attempts + 1, delete_after=utc_now() + after)
            )
