"""Use cases of the archive. Nothing here knows about HTTP."""
