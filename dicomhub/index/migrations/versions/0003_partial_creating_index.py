"""Index only the ``creating`` instance rows.

A full (status, created_at) index let SQLite's planner read every created instance through it for QIDO queries
(status = created is true of nearly every row); the cleanup that needs it looks for ``creating`` rows only.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_instance_status_created_at", "instance")
    op.create_index(
        "ix_instance_creating",
        "instance",
        ["created_at"],
        sqlite_where=sa.text("status = 0"),
        postgresql_where=sa.text("status = 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_instance_creating", "instance")
    op.create_index("ix_instance_status_created_at", "instance", ["status", "created_at"])
