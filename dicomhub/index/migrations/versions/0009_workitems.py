"""Worklist (UPS-RS) workitems, their search values, subscriptions and undelivered events.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

Key = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "workitem",
        sa.Column("workitem_key", Key, nullable=False, autoincrement=True),
        sa.Column("partition_key", Key, nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("transaction_uid", sa.String(64)),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("scheduled_start", sa.String(21)),
        sa.Column("study_uid", sa.String(64)),
        sa.Column("json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("workitem_key", name="pk_workitem"),
        sa.ForeignKeyConstraint(["partition_key"], ["partition.partition_key"], name="fk_workitem_partition_key"),
        sa.UniqueConstraint("partition_key", "sop_uid", name="uq_workitem_partition_key_sop_uid"),
    )
    for column in ("state", "patient_id", "patient_name", "scheduled_start"):
        op.create_index(f"ix_workitem_partition_key_{column}", "workitem", ["partition_key", column])
    op.create_table(
        "workitem_value",
        sa.Column("workitem_key", Key, nullable=False),
        sa.Column("attribute", sa.SmallInteger(), nullable=False),
        sa.Column("value", sa.String(324), nullable=False),
        sa.PrimaryKeyConstraint("workitem_key", "attribute", "value", name="pk_workitem_value"),
        sa.ForeignKeyConstraint(["workitem_key"], ["workitem.workitem_key"], name="fk_workitem_value_workitem_key"),
    )
    op.create_index("ix_workitem_value_attribute_value", "workitem_value", ["attribute", "value"])
    op.create_table(
        "workitem_subscription",
        sa.Column("partition_key", Key, nullable=False),
        sa.Column("aet", sa.String(16), nullable=False),
        sa.Column("workitem_uid", sa.String(64), nullable=False),
        sa.Column("deletion_lock", sa.SmallInteger(), nullable=False),
        sa.Column("suspended", sa.SmallInteger(), nullable=False),
        sa.Column("filters", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("partition_key", "aet", "workitem_uid", name="pk_workitem_subscription"),
        sa.ForeignKeyConstraint(
            ["partition_key"], ["partition.partition_key"], name="fk_workitem_subscription_partition_key"
        ),
    )
    op.create_index(
        "ix_workitem_subscription_partition_key_workitem_uid",
        "workitem_subscription",
        ["partition_key", "workitem_uid"],
    )
    op.create_table(
        "workitem_event",
        sa.Column("event_key", Key, nullable=False, autoincrement=True),
        sa.Column("partition_key", Key, nullable=False),
        sa.Column("aet", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("event_key", name="pk_workitem_event"),
    )
    op.create_index(
        "ix_workitem_event_partition_key_aet_event_key", "workitem_event", ["partition_key", "aet", "event_key"]
    )


def downgrade() -> None:
    op.drop_table("workitem_event")
    op.drop_table("workitem_subscription")
    op.drop_table("workitem_value")
    op.drop_table("workitem")
