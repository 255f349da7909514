"""Instance and series counts of each study and series (QIDO's NumberOfStudyRelatedSeries/Instances and
NumberOfSeriesRelatedInstances without counting rows per request), filled from the created instances.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CREATED = 1  # instance.status of a finished store; `creating` rows are not counted


def upgrade() -> None:
    # NOT NULL with a constant default: no table rebuild on SQLite, no rewrite on PostgreSQL
    op.add_column("study", sa.Column("series_count", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.add_column("study", sa.Column("instance_count", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.add_column("series", sa.Column("instance_count", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.execute(
        "UPDATE series SET instance_count = (SELECT count(*) FROM instance"
        f" WHERE instance.series_key = series.series_key AND instance.status = {CREATED})"
    )
    op.execute(
        "UPDATE study SET"
        f" instance_count = (SELECT count(*) FROM instance"
        f" WHERE instance.study_key = study.study_key AND instance.status = {CREATED}),"
        " series_count = (SELECT count(*) FROM series"
        " WHERE series.study_key = study.study_key AND series.instance_count > 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("instance_count")
    with op.batch_alter_table("study") as batch:
        batch.drop_column("instance_count")
        batch.drop_column("series_count")
