"""The index schema (SQLAlchemy Core). Alembic migrations under ``migrations/`` create and evolve it.

Every row carries ``partition_key``. Matching columns hold values already folded for comparison (upper-case,
accent-free for person names, padding stripped); responses are built from the stored DICOM JSON, not from them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

Key = BigInteger().with_variant(Integer, "sqlite")


class UtcDateTime(TypeDecorator):
    """Timestamps stored in UTC and always handed back time-zone aware (SQLite keeps no offset; PostgreSQL does)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

partition = Table(
    "partition",
    metadata,
    Column("partition_key", Key, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", UtcDateTime(), nullable=False),
)

watermark_allocator = Table(
    "watermark_allocator",
    metadata,
    Column("watermark", Key, primary_key=True, autoincrement=True),
)

study = Table(
    "study",
    metadata,
    Column("study_key", Key, primary_key=True, autoincrement=True),
    Column("partition_key", Key, ForeignKey("partition.partition_key"), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("watermark", Key, nullable=False),
    Column("patient_id", String(64)),
    Column("patient_name", String(324)),
    Column("patient_birth_date", String(8)),
    Column("accession_number", String(64)),
    Column("referring_physician_name", String(324)),
    Column("study_date", String(8)),
    Column("study_description", String(64)),
    # created instances and their series, kept by the store and delete transactions (QIDO's NumberOfStudyRelated*)
    Column("series_count", Integer, nullable=False, server_default=text("0")),
    Column("instance_count", Integer, nullable=False, server_default=text("0")),
    UniqueConstraint("partition_key", "study_uid"),
    Index(None, "partition_key", "watermark"),
    Index(None, "partition_key", "patient_id"),
    Index(None, "partition_key", "patient_name"),
    Index(None, "partition_key", "study_date"),
    Index(None, "partition_key", "accession_number"),
    Index(None, "partition_key", "study_description"),
)

series = Table(
    "series",
    metadata,
    Column("series_key", Key, primary_key=True, autoincrement=True),
    Column("partition_key", Key, ForeignKey("partition.partition_key"), nullable=False),
    Column("study_key", Key, ForeignKey("study.study_key"), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("watermark", Key, nullable=False),
    Column("modality", String(16)),
    Column("pps_start_date", String(8)),
    Column("manufacturer_model_name", String(64)),
    Column("instance_count", Integer, nullable=False, server_default=text("0")),  # created instances, as on study
    UniqueConstraint("study_key", "series_uid"),
    Index(None, "partition_key", "watermark"),
    Index(None, "partition_key", "series_uid"),
    Index(None, "partition_key", "modality"),
    Index(None, "partition_key", "manufacturer_model_name"),
)

INSTANCE_CREATING = 0
INSTANCE_CREATED = 1

instance = Table(
    "instance",
    metadata,
    Column("instance_key", Key, primary_key=True, autoincrement=True),
    Column("partition_key", Key, ForeignKey("partition.partition_key"), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("watermark", Key, nullable=False, unique=True),
    Column("status", SmallInteger, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("study_key", Key, ForeignKey("study.study_key")),
    Column("series_key", Key, ForeignKey("series.series_key")),
    Column("sop_class_uid", String(64)),
    Column("transfer_syntax_uid", String(64)),
    Column("blob_key", String(512)),
    Column("file_size", BigInteger),
    Column("frame_count", Integer),
    Column("frames", Text),
    # bulk update: the version as first stored (kept while the row points at the latest) and the operation that
    # wrote the latest (a re-run task skips instances it already updated)
    Column("original_watermark", Key),
    Column("original_blob_key", String(512)),
    Column("original_file_size", BigInteger),
    Column("updated_by", String(32)),
    UniqueConstraint("partition_key", "study_uid", "series_uid", "sop_uid"),
    Index(None, "study_key", "watermark"),
    Index(None, "series_key", "watermark"),
    Index(None, "partition_key", "sop_uid"),
    # only the rows of unfinished stores: a full status index misleads the planner (nearly all rows are created)
    Index("ix_instance_creating", "created_at", sqlite_where=text("status = 0"), postgresql_where=text("status = 0")),
)

instance_metadata = Table(
    "instance_metadata",
    metadata,
    Column("watermark", Key, primary_key=True, autoincrement=False),
    Column("json", Text, nullable=False),
)

NAME_PATIENT = 1
NAME_REFERRING_PHYSICIAN = 2

name_word = Table(
    "name_word",
    metadata,
    Column("study_key", Key, ForeignKey("study.study_key"), nullable=False),
    Column("attribute", SmallInteger, nullable=False),
    Column("word", String(64), nullable=False),
    UniqueConstraint("study_key", "attribute", "word"),
    Index(None, "attribute", "word"),
)

CHANGE_CREATE = 0
CHANGE_DELETE = 1
CHANGE_UPDATE = 2

change_feed = Table(
    "change_feed",
    metadata,
    Column("sequence", Key, primary_key=True, autoincrement=True),
    Column("timestamp", UtcDateTime(), nullable=False),
    Column("action", SmallInteger, nullable=False),
    Column("partition_key", Key, ForeignKey("partition.partition_key"), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("original_watermark", Key, nullable=False),
    Column("current_watermark", Key),
    Index(None, "timestamp", "sequence"),  # v2 pages: (timestamp, sequence) order
    Index(None, "partition_key", "study_uid", "series_uid", "sop_uid"),
)

blob_cleanup = Table(
    "blob_cleanup",
    metadata,
    Column("id", Key, primary_key=True, autoincrement=True),
    Column("blob_key", String(512), nullable=False),
    Column("delete_after", UtcDateTime(), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Index(None, "delete_after"),
)

# Long-running operations (re-index, bulk update, export): an operation is cut into tasks when it starts; workers
# claim tasks under a lease, so a crashed worker's task is taken up again and no task is done twice meanwhile.
operation = Table(
    "operation",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("type", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("parameters", Text, nullable=False),
    Column("resources", Text, nullable=False),
    Column("results", Text),
    Column("task_count", Integer, nullable=False, default=0),
    Column("tasks_done", Integer, nullable=False, default=0),
    # the lease of the worker planning or finishing the operation
    Column("lease_owner", String(64)),
    Column("lease_expires", UtcDateTime()),
    Index(None, "status", "created_at"),
    Index(None, "type", "status"),
)

TASK_PENDING = 0
TASK_DONE = 1

operation_task = Table(
    "operation_task",
    metadata,
    Column("operation_id", String(32), ForeignKey("operation.id", ondelete="CASCADE"), primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("status", SmallInteger, nullable=False),
    Column("payload", Text, nullable=False),
    Column("result", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_expires", UtcDateTime()),
    Index(None, "status", "lease_expires"),
)

# Extended query tags (global, not per partition): the tags, their values per level and kind, and indexing errors.
# A value row belongs to one study, series or instance (``resource_key`` is its study_key, series_key or instance_key,
# by the tag's level) and remembers the watermark of the instance it came from, so the newest instance wins.
EXTENDED_ADDING = 0
EXTENDED_READY = 1
EXTENDED_DELETING = 2

extended_query_tag = Table(
    "extended_query_tag",
    metadata,
    Column("tag_key", Key, primary_key=True, autoincrement=True),
    Column("path", String(8), nullable=False, unique=True),
    Column("vr", String(2), nullable=False),
    Column("private_creator", String(64)),
    Column("level", String(8), nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("query_enabled", SmallInteger, nullable=False),
    Column("operation_id", String(32)),
    Column("created_at", UtcDateTime(), nullable=False),
)

extended_query_tag_error = Table(
    "extended_query_tag_error",
    metadata,
    Column("tag_key", Key, primary_key=True, autoincrement=False),
    Column("watermark", Key, primary_key=True, autoincrement=False),
    Column("partition_key", Key, nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("message", Text, nullable=False),
)


def _extended_values(name: str, value_type) -> Table:
    return Table(
        name,
        metadata,
        Column("tag_key", Key, primary_key=True, autoincrement=False),
        Column("resource_key", Key, primary_key=True, autoincrement=False),
        Column("level", String(8), nullable=False),
        Column("partition_key", Key, nullable=False),
        Column("watermark", Key, nullable=False),
        Column("value", value_type, nullable=False),
        Index(None, "tag_key", "value", "resource_key"),  # QIDO: the value drives the search
        Index(None, "level", "resource_key"),  # delete of a study, series or instance
    )


extended_string = _extended_values("extended_string", String(324))
extended_long = _extended_values("extended_long", BigInteger)
extended_double = _extended_values("extended_double", Float(53))

extended_name_word = Table(
    "extended_name_word",
    metadata,
    Column("tag_key", Key, primary_key=True, autoincrement=False),
    Column("resource_key", Key, primary_key=True, autoincrement=False),
    Column("word", String(64), primary_key=True),
    Column("level", String(8), nullable=False),
    Index(None, "tag_key", "word", "resource_key"),
    Index(None, "level", "resource_key"),
)

# DICOMcast (change feed -> FHIR): the cursor and lease of each cast (``name``: one row per followed archive), and
# the entries it cast without an invalid attribute or skipped, with the reason.
cast_state = Table(
    "cast_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("cursor", Key, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_expires", UtcDateTime()),
    Column("updated_at", UtcDateTime(), nullable=False),
)

cast_failure = Table(
    "cast_failure",
    metadata,
    Column("id", Key, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("sequence", Key, nullable=False),
    Column("action", String(8), nullable=False),
    Column("partition_name", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("outcome", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Index(None, "name", "sequence"),
)

# Worklist (UPS-RS). A workitem row holds its DICOM JSON dataset, the search attributes PS3.18 11.9 / Azure index
# (folded like QIDO's), its state and owner's transaction UID, and a version that every write checks and increments
# (optimistic concurrency: a write based on a stale read changes nothing). Sequence-path attributes and the words of
# the patient's name may have several values: one ``workitem_value`` row each.
workitem = Table(
    "workitem",
    metadata,
    Column("workitem_key", Key, primary_key=True, autoincrement=True),
    Column("partition_key", Key, ForeignKey("partition.partition_key"), nullable=False),
    Column("sop_uid", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("transaction_uid", String(64)),
    Column("version", Integer, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("patient_id", String(64)),
    Column("patient_name", String(324)),
    Column("scheduled_start", String(21)),
    Column("study_uid", String(64)),
    Column("json", Text, nullable=False),
    UniqueConstraint("partition_key", "sop_uid"),
    Index(None, "partition_key", "state"),
    Index(None, "partition_key", "patient_id"),
    Index(None, "partition_key", "patient_name"),
    Index(None, "partition_key", "scheduled_start"),
)

workitem_value = Table(
    "workitem_value",
    metadata,
    Column("workitem_key", Key, ForeignKey("workitem.workitem_key"), primary_key=True, autoincrement=False),
    Column("attribute", SmallInteger, primary_key=True, autoincrement=False),
    Column("value", String(324), primary_key=True),
    Index(None, "attribute", "value"),
)

# Watch (PS3.4 CC.2.3): an AE title's subscription to one workitem, or its global subscription (workitem_uid is then
# the well-known global or filtered-global UID; ``filters`` holds the filtered one's conditions as JSON).
workitem_subscription = Table(
    "workitem_subscription",
    metadata,
    Column("partition_key", Key, ForeignKey("partition.partition_key"), primary_key=True, autoincrement=False),
    Column("aet", String(16), primary_key=True),
    Column("workitem_uid", String(64), primary_key=True),
    Column("deletion_lock", SmallInteger, nullable=False),
    Column("suspended", SmallInteger, nullable=False),
    Column("filters", Text),
    Column("created_at", UtcDateTime(), nullable=False),
    Index(None, "partition_key", "workitem_uid"),
)

# Events not yet delivered, one row per recipient, written in the transaction that changes the workitem. The channel
# holding the AE title's WebSocket sends them in key order and deletes them once sent: the rows are its queue.
workitem_event = Table(
    "workitem_event",
    metadata,
    Column("event_key", Key, primary_key=True, autoincrement=True),
    Column("partition_key", Key, nullable=False),
    Column("aet", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("payload", Text, nullable=False),
    Index(None, "partition_key", "aet", "event_key"),
)

# DIMSE storage commitment requests whose N-EVENT-REPORT is not delivered yet (``sop_references``: JSON list of
# [SOP class UID, SOP instance UID]); ``due_at``: the next delivery try, moved forward by whoever claims the row.
dimse_commitment = Table(
    "dimse_commitment",
    metadata,
    Column("commitment_key", Key, primary_key=True, autoincrement=True),
    Column("calling_aet", String(16), nullable=False),
    Column("partition_name", String(64), nullable=False),
    Column("transaction_uid", String(64), nullable=False),
    Column("sop_references", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("due_at", UtcDateTime(), nullable=False),
    Index(None, "due_at"),
)
