"""The blob-store interface the domain depends on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol


class BlobStore(Protocol):
    """Durable, immutable blobs addressed by key. A key is written once and never overwritten."""

    def new_staging_file(self) -> Path:
        """A fresh local path to spool an upload into before it becomes a blob."""

    def put_file(self, key: str, staged: Path) -> None:
        """Makes ``staged`` durable under ``key`` (consuming it); returns only once it survives a crash."""

    def open(self, key: str) -> BinaryIO:
        """A seekable binary reader; raises ``FileNotFoundError`` for a missing key."""

    def iter_range(self, key: str, offset: int = 0, length: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        """Streams ``length`` bytes (to the end when ``None``) from ``offset``."""

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Removes a blob; a missing key is not an error."""

    def discard_staging(self, staged: Path) -> None: ...

    def purge_staging(self, older_than: float) -> int:
        """Removes spooled uploads untouched for ``older_than`` seconds (left by a crash); returns how many."""

    def health(self) -> None:
        """Raises when the store cannot be written."""
