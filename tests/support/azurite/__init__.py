"""Azurite (npm azurite, pinned in package.json, installed by scripts/test.sh) as an Azure Blob endpoint on loopback.

Started with the well-known development account, in memory, API version check and telemetry off (the telemetry
flush otherwise keeps the process alive for up to a minute after SIGTERM).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.servers import free_port
from tests.support.processes import answers, start_process, stop_process

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
        self.process = start_process(
            args,
            self.data_dir / "azurite.log",
            "Azurite",
            lambda: answers(f"{self.endpoint}?comp=list", status=None),
            interval=0.2,
            cwd=self.data_dir,
        )
        try:
            for name in CONTAINERS:
                self.service().create_container(name)
        except BaseException:
            self.stop()  # nobody else holds the process yet
            raise
        return self

    def service(self):
        """An azure-storage-blob client of the account (tests use it to create containers, SAS and to read back)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def stop(self) -> None:
        stop_process(self.process)
