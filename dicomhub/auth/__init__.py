"""Security adapter: bearer tokens, roles and data actions on every route, and the audit log."""
