"""Azurite (npm azurite, pinned in package.json, installed by scripts/test.sh) as an Azure Blob endpoint on loopback.

Started with the well-known development account, in memory, API version check and telemetry off (the telemetry
flush otherwise keeps the process alive for up to a minute after SIGTERM).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.servers import free_port

HERE = Path(__file__).parent
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINERS = ("dicom", "exports", "imports")


def installed() -> bool:
    return (HERE / "node_modules" / ".bin" / "azurite-blob").exists()


class Azurite:
    """One azurite-blob process with containers :data:`CONTAINERS`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def start(self) -> Azurite:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(HERE / "node_modules" / ".bin" / "azurite-blob"), "--blobHost", "127.0.0.1", "--blobPort",
            str(self.port), "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
        ]  # fmt: skip
        log = open(self.data_dir / "azurite.log", "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"azurite exited: {(self.data_dir / 'azurite.log').read_text()[-3000:]}")
            try:
                httpx.get(f"{self.endpoint}?comp=list", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError("Azurite did not become ready")
        for name in CONTAINERS:
            self.service().create_container(name)
        return self

    def service(self):
        """An azure-storage-blob client of the account (tests use it to create containers, SAS and to read back)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
