"""Blobs as files under one folder: fsync then atomic rename, so an acknowledged file survives a crash."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dicomhub.blobs.base import LocalStaging, Staged

FSYNC_THREADS = 8  # fsyncs of one batch in flight at once (threads that wait on the disk, not the CPU)


class FileSystemBlobStore(LocalStaging):
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root.resolve()
        self._root_text = str(self.root)
        self._root_prefix = self._root_text + os.sep
        self.staging = self.root / ".staging"
        self.fsync = fsync
        self.staging.mkdir(parents=True, exist_ok=True)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_guard = threading.Lock()

    def _path(self, key: str) -> Path:
        """The file of a key; lexical normalisation (no file-system calls: this is on every read) keeps it inside."""
        path = os.path.normpath(os.path.join(self._root_text, key))
        if not path.startswith(self._root_prefix):
            raise ValueError(f"blob key escapes the store: {key!r}")
        return Path(path)

    def put(self, key: str, staged: Staged) -> None:
        target = self._path(key)
        if staged.data is not None:
            self._write_new(target, staged.data)
        else:
            if self.fsync:
                fd = os.open(staged.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._in_folder(target, lambda: os.replace(staged.path, target))
        if self.fsync:
            _fsync(target.parent)

    def put_many(self, items: Sequence[tuple[str, Staged]]) -> None:
        """Several puts whose fsyncs run side by side: every file is written first, then fsynced on up to
        :data:`FSYNC_THREADS` threads (the file system commits concurrent fsyncs together: 0.23 instead of 0.38 ms
        a file for 50 CT instances here), then moved (spooled uploads) and its folder fsynced, once per folder.
        Returns once all of them survive a crash; on an exception any of them may have been written."""
        if len(items) < 2 or not self.fsync:
            for key, staged in items:
                self.put(key, staged)
            return
        files: list[tuple[Path, Path | None]] = []  # (target, spool file to move there)
        for key, staged in items:
            target = self._path(key)
            if staged.data is not None:
                self._in_folder(target, lambda target=target, data=staged.data: _create(target, data))
                files.append((target, None))
            else:
                files.append((target, staged.path))
        for _ in self._fsync_pool().map(_fsync, [spool or target for target, spool in files]):
            pass
        for target, spool in files:
            if spool is not None:
                self._in_folder(target, lambda target=target, spool=spool: os.replace(spool, target))
        for folder in dict.fromkeys(target.parent for target, _ in files):
            _fsync(folder)

    def _fsync_pool(self) -> ThreadPoolExecutor:
        with self._pool_guard:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="blob-fsync")
            return self._pool

    def _write_new(self, target: Path, data: bytes | bytearray) -> None:
        """Writes straight to the final name: keys are never reused, and an index row points at a key only after
        this returned, so a file cut short by a crash is an orphan, never a visible instance."""

        def write() -> None:
            with open(target, "xb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())

        self._in_folder(target, write)

    @staticmethod
    def _in_folder(target: Path, action) -> None:
        """Runs ``action`` (which creates ``target``), making its folder when missing: first without asking (the
        folder of a series exists after its first instance, and asking costs a failed mkdir per store)."""
        for attempt in range(4):
            try:
                action()
                return
            except FileNotFoundError:  # no folder yet, or a concurrent delete pruned it between mkdir and the write
                if attempt == 3:
                    raise
            target.parent.mkdir(parents=True, exist_ok=True)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")  # noqa: SIM115 - the caller owns the handle

    def iter_range(self, key: str, offset: int = 0, length: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        with self.open(key) as f:
            f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                data = f.read(chunk if remaining is None else min(chunk, remaining))
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:  # prune folders left empty, up to the store's root
            if folder == self.root or folder == self.staging:
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def health(self) -> None:
        probe = self.staging / f"health-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()


def _create(target: Path, data: bytes | bytearray) -> None:
    with open(target, "xb") as f:
        f.write(data)


def _fsync(path: Path) -> None:
    """fsync of a file or a folder (a folder's makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
