"""Index the change feed in its v2 order, (timestamp, sequence).

PostgreSQL could read the timestamp index only with a sort of each run of equal timestamps (a batch of a store
shares one); SQLite's index already ended in the rowid, which is the sequence.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_change_feed_timestamp", "change_feed")
    op.create_index("ix_change_feed_timestamp_sequence", "change_feed", ["timestamp", "sequence"])


def downgrade() -> None:
    op.drop_index("ix_change_feed_timestamp_sequence", "change_feed")
    op.create_index("ix_change_feed_timestamp", "change_feed", ["timestamp"])
