"""Long-running operations and their tasks.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "operation",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),
        sa.Column("resources", sa.Text(), nullable=False),
        sa.Column("results", sa.Text()),
        sa.Column("task_count", sa.Integer(), nullable=False),
        sa.Column("tasks_done", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name="pk_operation"),
    )
    op.create_index("ix_operation_status_created_at", "operation", ["status", "created_at"])
    op.create_index("ix_operation_type_status", "operation", ["type", "status"])
    op.create_table(
        "operation_task",
        sa.Column("operation_id", sa.String(32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("result", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["operation.id"], name="fk_operation_task_operation_id", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("operation_id", "number", name="pk_operation_task"),
    )
    op.create_index("ix_operation_task_status_lease_expires", "operation_task", ["status", "lease_expires"])


def downgrade() -> None:
    op.drop_table("operation_task")
    op.drop_table("operation")
