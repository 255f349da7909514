"""Extended query tags, their values (string, integer, real; person-name words) and indexing errors.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")
VALUE_TABLES = {
    "extended_string": sa.String(324),
    "extended_long": sa.BigInteger(),
    "extended_double": sa.Float(53),
}


def upgrade() -> None:
    op.create_table(
        "extended_query_tag",
        sa.Column("tag_key", Key, nullable=False, autoincrement=True),
        sa.Column("path", sa.String(8), nullable=False),
        sa.Column("vr", sa.String(2), nullable=False),
        sa.Column("private_creator", sa.String(64)),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("query_enabled", sa.SmallInteger(), nullable=False),
        sa.Column("operation_id", sa.String(32)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tag_key", name="pk_extended_query_tag"),
        sa.UniqueConstraint("path", name="uq_extended_query_tag_path"),
    )
    op.create_table(
        "extended_query_tag_error",
        sa.Column("tag_key", Key, nullable=False),
        sa.Column("watermark", Key, nullable=False),
        sa.Column("partition_key", Key, nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tag_key", "watermark", name="pk_extended_query_tag_error"),
    )
    for name, value_type in VALUE_TABLES.items():
        op.create_table(
            name,
            sa.Column("tag_key", Key, nullable=False),
            sa.Column("resource_key", Key, nullable=False),
            sa.Column("level", sa.String(8), nullable=False),
            sa.Column("partition_key", Key, nullable=False),
            sa.Column("watermark", Key, nullable=False),
            sa.Column("value", value_type, nullable=False),
            sa.PrimaryKeyConstraint("tag_key", "resource_key", name=f"pk_{name}"),
        )
        op.create_index(f"ix_{name}_tag_key_value_resource_key", name, ["tag_key", "value", "resource_key"])
        op.create_index(f"ix_{name}_level_resource_key", name, ["level", "resource_key"])
    op.create_table(
        "extended_name_word",
        sa.Column("tag_key", Key, nullable=False),
        sa.Column("resource_key", Key, nullable=False),
        sa.Column("word", sa.String(64), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("tag_key", "resource_key", "word", name="pk_extended_name_word"),
    )
    op.create_index(
        "ix_extended_name_word_tag_key_word_resource_key", "extended_name_word", ["tag_key", "word", "resource_key"]
    )
    op.create_index("ix_extended_name_word_level_resource_key", "extended_name_word", ["level", "resource_key"])


def downgrade() -> None:
    op.drop_table("extended_name_word")
    for name in VALUE_TABLES:
        op.drop_table(name)
    op.drop_table("extended_query_tag_error")
    op.drop_table("extended_query_tag")
