"""Indexes for prefix (wildcard and fuzzy) matching, and study description.

PostgreSQL's btree indexes under a non-C collation cannot serve ``LIKE 'ABC%'``; ``varchar_pattern_ops`` ones can.
SQLite uses the ordinary indexes because the engine turns ``case_sensitive_like`` on (values are folded anyway).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PATTERN_COLUMNS = {
    "study": ["patient_id", "patient_name", "accession_number", "referring_physician_name", "study_description"],
    "series": ["modality", "manufacturer_model_name"],
    "name_word": ["word"],
}


def upgrade() -> None:
    op.create_index("ix_study_partition_key_study_description", "study", ["partition_key", "study_description"])
    op.create_index(
        "ix_series_partition_key_manufacturer_model_name", "series", ["partition_key", "manufacturer_model_name"]
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in PATTERN_COLUMNS.items():
        for column in columns:
            op.create_index(
                f"ix_{table}_{column}_pattern", table, [column], postgresql_ops={column: "varchar_pattern_ops"}
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in PATTERN_COLUMNS.items():
            for column in columns:
                op.drop_index(f"ix_{table}_{column}_pattern", table)
    op.drop_index("ix_series_partition_key_manufacturer_model_name", "series")
    op.drop_index("ix_study_partition_key_study_description", "study")
