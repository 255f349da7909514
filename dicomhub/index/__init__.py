"""The metadata index: one interface over SQLite and PostgreSQL."""
