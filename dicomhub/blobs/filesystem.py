"""Blobs as files under one folder: fsync then atomic rename, so an acknowledged file survives a crash."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dicomhub.blobs.base import LocalStaging, Staged

STAGE_WRITERS = 4  # uploads written ahead at once (each mostly waits for its fsync)


class FileSystemBlobStore(LocalStaging):
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root.resolve()
        self._root_text = str(self.root)
        self._root_prefix = self._root_text + os.sep
        self.staging = self.root / ".staging"
        self.fsync = fsync
        self.staging.mkdir(parents=True, exist_ok=True)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_guard = threading.Lock()

    def _path(self, key: str) -> Path:
        """The file of a key; lexical normalisation (no file-system calls: this is on every read) keeps it inside."""
        path = os.path.normpath(os.path.join(self._root_text, key))
        if not path.startswith(self._root_prefix):
            raise ValueError(f"blob key escapes the store: {key!r}")
        return Path(path)

    def stage(self, staged: Staged) -> None:
        """Writes and fsyncs an upload in memory to a staging file in the background while the store validates it
        and reserves its key; ``put`` then only moves that file to the key and fsyncs the folder. The fsync, the
        longest wait of a small store, so overlaps the store's own work instead of following it."""
        if not self.fsync or staged.data is None or staged.pending is not None:
            return
        staged.pending = self._writers().submit(_write_durably, self.new_staging_file(), staged.data)

    def _writers(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._executor_guard:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(STAGE_WRITERS, thread_name_prefix="blob-stage")
        return self._executor

    def put(self, key: str, staged: Staged) -> None:
        target = self._path(key)
        if staged.pending is not None:
            copy = staged.pending.result()  # written and fsynced (raises what the write raised)
            self._in_folder(target, lambda: os.replace(copy, target))
        elif staged.data is not None:
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
            _fsync_dir(target.parent)

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


def _write_durably(path: Path, data: bytearray) -> Path:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
