"""Versions of updated instances (bulk update): the original version's watermark, file and size, and the operation
that wrote the latest version.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")
COLUMNS = ("original_watermark", "original_blob_key", "original_file_size", "updated_by")


def upgrade() -> None:
    # plain ADD COLUMN (nullable, no default): no table rebuild on SQLite, no rewrite on PostgreSQL
    op.add_column("instance", sa.Column("original_watermark", Key))
    op.add_column("instance", sa.Column("original_blob_key", sa.String(512)))
    op.add_column("instance", sa.Column("original_file_size", sa.BigInteger()))
    op.add_column("instance", sa.Column("updated_by", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
