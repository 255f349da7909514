"""The blob-store interface the domain depends on, and the staged uploads it turns into blobs."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

# An upload is kept in memory while it and the rest of its request stay under these sizes; beyond, it is spooled
# to a local file. Small instances (the common case) then cost no file creation before their final write.
MEMORY_PART_LIMIT = 8 * 1024 * 1024
MEMORY_REQUEST_LIMIT = 32 * 1024 * 1024


class Staged:
    """An upload on its way to becoming a blob: bytes in memory, or a spool file on the local disk."""

    def __init__(self, path: Path | None = None, data: bytearray | None = None) -> None:
        self.path = path
        self.data = data if path is None else None
        if self.path is None and self.data is None:
            self.data = bytearray()

    def open(self) -> BinaryIO:
        """A seekable reader over the upload's bytes."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return open(self.path, "rb")  # noqa: SIM115 - the caller owns the handle

    def zero_preamble(self) -> None:
        """PS3.10 preambles may carry another format (TIFF); a stored file's is zeroed."""
        if self.data is not None:
            if len(self.data) >= 132 and self.data[128:132] == b"DICM":
                self.data[:128] = bytes(128)
            return
        with open(self.path, "r+b") as f:
            head = f.read(132)
            if len(head) == 132 and head[128:132] == b"DICM" and head[:128] != bytes(128):
                f.seek(0)
                f.write(bytes(128))


class BlobStore(Protocol):
    """Durable, immutable blobs addressed by key. A key is written once and never overwritten."""

    def new_staging_file(self) -> Path:
        """A fresh local path to spool a large upload into before it becomes a blob."""

    def put(self, key: str, staged: Staged) -> None:
        """Makes ``staged`` durable under ``key`` (consuming it); returns only once it survives a crash."""

    def put_many(self, items: Sequence[tuple[str, Staged]]) -> None:
        """``put`` of each (key, upload), possibly side by side; on an exception any of them may have been put."""

    def open(self, key: str) -> BinaryIO:
        """A seekable binary reader; raises ``FileNotFoundError`` for a missing key."""

    def iter_range(self, key: str, offset: int = 0, length: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        """Streams ``length`` bytes (to the end when ``None``) from ``offset``."""

    def delete(self, key: str) -> None:
        """Removes a blob; a missing key is not an error."""

    def discard(self, staged: Staged) -> None:
        """Drops an upload that will not become a blob."""

    def purge_staging(self, older_than: float) -> int:
        """Removes spooled uploads untouched for ``older_than`` seconds (left by a crash); returns how many."""

    def health(self) -> None:
        """Raises when the store cannot be written."""


def purge_old_files(folder: Path, older_than: float) -> int:
    """Removes the files of ``folder`` untouched for ``older_than`` seconds; returns how many (a staging folder's
    spool files a crash left behind)."""
    cutoff = time.time() - older_than
    removed = 0
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class LocalStaging:
    """Uploads spooled to files of a local ``staging`` folder before ``put`` (both stores spool the same way)."""

    staging: Path

    def new_staging_file(self) -> Path:
        return self.staging / f"{uuid.uuid4().hex}.part"

    def put_many(self, items: Sequence[tuple[str, Staged]]) -> None:
        """One ``put`` after the other."""
        for key, staged in items:
            self.put(key, staged)  # type: ignore[attr-defined]

    def discard(self, staged: Staged) -> None:
        if staged.path is not None:
            staged.path.unlink(missing_ok=True)

    def purge_staging(self, older_than: float) -> int:
        return purge_old_files(self.staging, older_than)
