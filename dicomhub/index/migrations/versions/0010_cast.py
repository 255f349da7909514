"""DICOMcast: the cast's cursor, lease and failed entries.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "cast_state",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("cursor", Key, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_cast_state"),
    )
    op.create_table(
        "cast_failure",
        sa.Column("id", Key, nullable=False, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("sequence", Key, nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("partition_name", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cast_failure"),
    )
    op.create_index("ix_cast_failure_name_sequence", "cast_failure", ["name", "sequence"])


def downgrade() -> None:
    op.drop_table("cast_failure")
    op.drop_table("cast_state")
