"""A private Orthanc (Debian orthanc, installed by scripts/test.sh) as a real peer of the tests and benchmarks."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port
from tests.support.processes import answers, start_process, stop_process

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """One Orthanc with its own storage under ``home`` and its HTTP API on a free loopback port, without
    authentication; ``settings`` add to or replace its configuration (DICOM, plugins, peers)."""

    def __init__(self, home: Path, name: str, **settings: Any) -> None:
        self.home = home
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": name,
            "StorageDirectory": str(home / "storage"),
            "IndexDirectory": str(home / "storage"),
            "TemporaryDirectory": str(home / "tmp"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            **settings,
        }
        self.process = None

    def start(self, ready: Callable[[], bool] | None = None, env: dict[str, str] | None = None) -> Orthanc:
        """Returns once ``ready()`` (by default: its HTTP API answers)."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "orthanc.json").write_text(json.dumps(self.config))
        self.process = start_process(
            [str(ORTHANC), str(self.home / "orthanc.json")],
            self.home / "orthanc.log",
            "Orthanc",
            ready or (lambda: answers(f"{self.url}/system")),
            env=env,
        )
        return self

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.home / "storage", ignore_errors=True)


@contextmanager
def running_orthanc(home: Path, name: str, **settings: Any) -> Iterator[httpx.Client]:
    """An :class:`Orthanc` for the block, as a client of its HTTP API; stopped and its storage removed after."""
    orthanc = Orthanc(home, name, **settings).start()
    try:
        with httpx.Client(base_url=orthanc.url, timeout=60) as client:
            yield client
    finally:
        orthanc.stop()
