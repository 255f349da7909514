"""DIMSE: storage commitment requests whose report is not delivered yet.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "dimse_commitment",
        sa.Column("commitment_key", Key, nullable=False, autoincrement=True),
        sa.Column("calling_aet", sa.String(16), nullable=False),
        sa.Column("partition_name", sa.String(64), nullable=False),
        sa.Column("transaction_uid", sa.String(64), nullable=False),
        sa.Column("sop_references", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("commitment_key", name="pk_dimse_commitment"),
    )
    op.create_index("ix_dimse_commitment_due_at", "dimse_commitment", ["due_at"])


def downgrade() -> None:
    op.drop_table("dimse_commitment")
