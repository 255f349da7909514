"""The object stores of the tests: one SeaweedFS (S3) and one Azurite per test process, started on first use.

``DICOMHUB_TEST_BLOB=s3|azure`` puts every test server's files in that store (each server under its own prefix);
the export, import and blob tests use the same processes directly.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import os
import tempfile
from pathlib import Path

import obstore
import pytest

from dicomhub.blobs.object_store import store_from_url
from tests.support.azurite import Azurite, installed
from tests.support.seaweedfs import SeaweedFS

BACKEND_ENV = "DICOMHUB_TEST_BLOB"
_running: dict[str, SeaweedFS | Azurite] = {}


def test_backend() -> str | None:
    """The backend every test server uses: None (filesystem), 's3' or 'azure'."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if value in ("", "file", "filesystem"):
        return None
    if value not in ("s3", "azure"):
        raise RuntimeError(f"{BACKEND_ENV} must be s3 or azure, not {value!r}")
    return value


def _started(name: str, make) -> SeaweedFS | Azurite:
    if name not in _running:
        folder = Path(tempfile.mkdtemp(prefix=f"dicomhub-{name}-"))
        _running[name] = make(folder).start()
        atexit.register(_running[name].stop)
    return _running[name]


def seaweedfs() -> SeaweedFS:
    return _started("s3", SeaweedFS)


def azurite() -> Azurite:
    if not installed():
        if os.environ.get("CI"):
            pytest.fail("Azurite is not installed: scripts/test.sh installs it into tests/support/azurite")
        pytest.skip("Azurite is not installed (npm ci in tests/support/azurite)")
    return _started("azure", Azurite)


def server_blob_settings(backend: str | None, data_dir: Path) -> dict[str, str]:
    """Environment for one test server on ``backend``: the store's credentials and a prefix of its data folder's
    own, so a server started again on the same folder finds its files."""
    if backend is None:
        return {}
    prefix = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    if backend == "s3":
        return {**seaweedfs().env(), "DICOMHUB_BLOB_URL": f"s3://dicom/{prefix}"}
    return {**azurite().env(), "DICOMHUB_BLOB_URL": f"azure://dicom/{prefix}"}


class StoredObject:
    """An object of a test server's store, with the two Path methods tests use on blob files."""

    def __init__(self, store, name: str) -> None:
        self.store = store
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredObject) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"StoredObject({self.name!r})"

    def exists(self) -> bool:
        try:
            obstore.head(self.store, self.name)
            return True
        except FileNotFoundError:
            return False

    def read_bytes(self) -> bytes:
        return bytes(obstore.get(self.store, self.name).bytes())


def server_blob_files(blob_env: dict[str, str], data_dir: Path, pattern: str) -> list:
    """The blob files of one test server whose keys match the glob ``pattern`` (Paths on the filesystem)."""
    if not blob_env.get("DICOMHUB_BLOB_URL"):
        return list((data_dir / "blobs").glob(pattern))
    store = store_from_url(blob_env["DICOMHUB_BLOB_URL"], env=blob_env)
    names = [meta["path"] for page in obstore.list(store) for meta in page]
    return [StoredObject(store, name) for name in names if fnmatch.fnmatchcase(name, pattern)]
