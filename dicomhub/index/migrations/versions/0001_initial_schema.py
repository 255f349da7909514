"""initial schema

Revision ID: 0001
Revises:
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_cleanup",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("blob_key", sa.String(length=512), nullable=False),
        sa.Column("delete_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blob_cleanup")),
    )
    with op.batch_alter_table("blob_cleanup", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_blob_cleanup_delete_after"), ["delete_after"], unique=False)

    op.create_table(
        "instance_metadata",
        sa.Column(
            "watermark",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("watermark", name=op.f("pk_instance_metadata")),
    )
    op.create_table(
        "partition",
        sa.Column(
            "partition_key",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("partition_key", name=op.f("pk_partition")),
        sa.UniqueConstraint("name", name=op.f("uq_partition_name")),
    )
    op.create_table(
        "watermark_allocator",
        sa.Column(
            "watermark",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("watermark", name=op.f("pk_watermark_allocator")),
    )
    op.create_table(
        "change_feed",
        sa.Column(
            "sequence",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.SmallInteger(), nullable=False),
        sa.Column("partition_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("original_watermark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("current_watermark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.ForeignKeyConstraint(
            ["partition_key"], ["partition.partition_key"], name=op.f("fk_change_feed_partition_key")
        ),
        sa.PrimaryKeyConstraint("sequence", name=op.f("pk_change_feed")),
    )
    with op.batch_alter_table("change_feed", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_change_feed_partition_key_study_uid_series_uid_sop_uid"),
            ["partition_key", "study_uid", "series_uid", "sop_uid"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_change_feed_timestamp"), ["timestamp"], unique=False)

    op.create_table(
        "study",
        sa.Column(
            "study_key",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("partition_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("watermark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("patient_name", sa.String(length=324), nullable=True),
        sa.Column("patient_birth_date", sa.String(length=8), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("referring_physician_name", sa.String(length=324), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_description", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["partition_key"], ["partition.partition_key"], name=op.f("fk_study_partition_key")),
        sa.PrimaryKeyConstraint("study_key", name=op.f("pk_study")),
        sa.UniqueConstraint("partition_key", "study_uid", name=op.f("uq_study_partition_key_study_uid")),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_partition_key_accession_number"),
            ["partition_key", "accession_number"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_study_partition_key_patient_id"), ["partition_key", "patient_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_study_partition_key_patient_name"), ["partition_key", "patient_name"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_study_partition_key_study_date"), ["partition_key", "study_date"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_study_partition_key_watermark"), ["partition_key", "watermark"], unique=False
        )

    op.create_table(
        "name_word",
        sa.Column("study_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("attribute", sa.SmallInteger(), nullable=False),
        sa.Column("word", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["study_key"], ["study.study_key"], name=op.f("fk_name_word_study_key")),
        sa.UniqueConstraint("study_key", "attribute", "word", name=op.f("uq_name_word_study_key_attribute_word")),
    )
    with op.batch_alter_table("name_word", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_name_word_attribute_word"), ["attribute", "word"], unique=False)

    op.create_table(
        "series",
        sa.Column(
            "series_key",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("partition_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("study_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("watermark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("pps_start_date", sa.String(length=8), nullable=True),
        sa.Column("manufacturer_model_name", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["partition_key"], ["partition.partition_key"], name=op.f("fk_series_partition_key")),
        sa.ForeignKeyConstraint(["study_key"], ["study.study_key"], name=op.f("fk_series_study_key")),
        sa.PrimaryKeyConstraint("series_key", name=op.f("pk_series")),
        sa.UniqueConstraint("study_key", "series_uid", name=op.f("uq_series_study_key_series_uid")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_series_partition_key_modality"), ["partition_key", "modality"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_series_partition_key_series_uid"), ["partition_key", "series_uid"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_series_partition_key_watermark"), ["partition_key", "watermark"], unique=False
        )

    op.create_table(
        "instance",
        sa.Column(
            "instance_key",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("partition_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("watermark", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("study_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("series_key", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=True),
        sa.Column("blob_key", sa.String(length=512), nullable=True),
        sa.Column("file_size", sa.BigInteger(), nullable=True),
        sa.Column("frame_count", sa.Integer(), nullable=True),
        sa.Column("frames", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["partition_key"], ["partition.partition_key"], name=op.f("fk_instance_partition_key")),
        sa.ForeignKeyConstraint(["series_key"], ["series.series_key"], name=op.f("fk_instance_series_key")),
        sa.ForeignKeyConstraint(["study_key"], ["study.study_key"], name=op.f("fk_instance_study_key")),
        sa.PrimaryKeyConstraint("instance_key", name=op.f("pk_instance")),
        sa.UniqueConstraint(
            "partition_key",
            "study_uid",
            "series_uid",
            "sop_uid",
            name=op.f("uq_instance_partition_key_study_uid_series_uid_sop_uid"),
        ),
        sa.UniqueConstraint("watermark", name=op.f("uq_instance_watermark")),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instance_partition_key_sop_uid"), ["partition_key", "sop_uid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_instance_series_key_watermark"), ["series_key", "watermark"], unique=False)
        batch_op.create_index(batch_op.f("ix_instance_status_created_at"), ["status", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_instance_study_key_watermark"), ["study_key", "watermark"], unique=False)
    partition = sa.table("partition", sa.column("name", sa.String), sa.column("created_at", sa.DateTime(timezone=True)))
    op.execute(partition.insert().values(name="Microsoft.Default", created_at=datetime.now(UTC)))


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_study_key_watermark"))
        batch_op.drop_index(batch_op.f("ix_instance_status_created_at"))
        batch_op.drop_index(batch_op.f("ix_instance_series_key_watermark"))
        batch_op.drop_index(batch_op.f("ix_instance_partition_key_sop_uid"))

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_partition_key_watermark"))
        batch_op.drop_index(batch_op.f("ix_series_partition_key_series_uid"))
        batch_op.drop_index(batch_op.f("ix_series_partition_key_modality"))

    op.drop_table("series")
    with op.batch_alter_table("name_word", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_name_word_attribute_word"))

    op.drop_table("name_word")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_partition_key_watermark"))
        batch_op.drop_index(batch_op.f("ix_study_partition_key_study_date"))
        batch_op.drop_index(batch_op.f("ix_study_partition_key_patient_name"))
        batch_op.drop_index(batch_op.f("ix_study_partition_key_patient_id"))
        batch_op.drop_index(batch_op.f("ix_study_partition_key_accession_number"))

    op.drop_table("study")
    with op.batch_alter_table("change_feed", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_change_feed_timestamp"))
        batch_op.drop_index(batch_op.f("ix_change_feed_partition_key_study_uid_series_uid_sop_uid"))

    op.drop_table("change_feed")
    op.drop_table("watermark_allocator")
    op.drop_table("partition")
    op.drop_table("instance_metadata")
    with op.batch_alter_table("blob_cleanup", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_blob_cleanup_delete_after"))

    op.drop_table("blob_cleanup")
