"""Runs dicomhub as a real server process on a free loopback port, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg

from tests.support.processes import answers, start_process

POSTGRES_ENV = "DICOMHUB_TEST_POSTGRES_URL"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_postgres_database(admin_url: str) -> str:
    """Creates an empty database next to the one in ``admin_url`` and returns its SQLAlchemy URL."""
    name = f"dicomhub_{uuid.uuid4().hex[:12]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{name}"


def database_url(engine: str) -> str | None:
    """``None`` for SQLite; for PostgreSQL a fresh database (skipped locally, a failure in CI, without a server)."""
    import pytest

    if engine == "sqlite":
        return None
    admin = os.environ.get(POSTGRES_ENV)
    if not admin:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: CI must run the PostgreSQL suite (scripts/test.sh sets it)")
        pytest.skip(f"{POSTGRES_ENV} not set; run the suite through scripts/test.sh for PostgreSQL")
    return new_postgres_database(admin)


class Server:
    """One dicomhub process; ``url`` is its root (``http://127.0.0.1:PORT``)."""

    def __init__(self, data_dir: Path, database_url: str | None = None, **settings: str) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir / "server.log"
        from tests.support.object_stores import server_blob_settings, test_backend  # that module imports this one

        # DICOMHUB_TEST_BLOB=s3|azure: files in that store, under a prefix of the data folder's own
        self.blob_env = {} if "blob_url" in settings else server_blob_settings(test_backend(), data_dir)

    def blob_files(self, pattern: str) -> list:
        """The server's stored files whose keys match ``pattern`` (a glob), on whichever backend it runs."""
        from tests.support.object_stores import server_blob_files

        return server_blob_files(self.blob_env, self.data_dir, pattern)

    @property
    def engine(self) -> str:
        return "postgres" if self.database_url else "sqlite"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
        env["DICOMHUB_DATA_DIR"] = str(self.data_dir)
        env["DICOMHUB_CLEANUP_INTERVAL_SECONDS"] = "0.5"
        env["DICOMHUB_DELETE_DELAY_SECONDS"] = "0"  # tests check that files go; production keeps them a minute
        env["DICOMHUB_WORKERS"] = "1"  # one process, so kill() reaches the server itself; see test_workers.py
        if self.database_url:
            env["DICOMHUB_DATABASE_URL"] = self.database_url
        env.update(self.blob_env)
        from tests.support.oidc.provider import with_auth_mode  # imported here: that module imports this one

        for key, value in with_auth_mode(self.url, self.settings).items():
            env[f"DICOMHUB_{key.upper()}"] = value
        return env

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = start_process(
            [sys.executable, "-m", "dicomhub", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            self.log_path,
            "server",
            lambda: answers(f"{self.url}/health/check"),
            seconds=180,  # a loaded CI machine may take long
            env=self.env(),
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
