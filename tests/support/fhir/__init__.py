"""The loopback FHIR R4 server of the DICOMcast tests (``server.mjs``: npm ``@medplum/fhir-router``, in memory) as a
process the tests start, stop and start again on the same port (its data lives in memory: a restart empties it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx

from tests.servers import free_port
from tests.support.processes import answers, start_process, stop_process

HERE = Path(__file__).parent


def _node_command() -> list[str]:
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise RuntimeError(f"node and {HERE}/node_modules are needed: run `npm ci` there (scripts/test.sh does)")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip("v\n").split(".")[0])
    # @medplum/core needs a global WebSocket: Node 22 has one, Node 20 behind a flag
    return [node, "--experimental-websocket"] if major < 22 else [node]


class FhirServer:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/fhir/R4"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> FhirServer:
        self.process = start_process(
            [*_node_command(), str(HERE / "server.mjs"), str(self.port)],
            self.log_path,
            "FHIR server",
            lambda: answers(f"{self.url}/metadata"),
            cwd=HERE,
        )
        return self

    def stop(self) -> None:
        stop_process(self.process)

    def search(self, resource_type: str, **params: str) -> list[dict]:
        response = httpx.get(f"{self.url}/{resource_type}", params={"_count": "1000", **params}, timeout=30)
        response.raise_for_status()
        return [e["resource"] for e in response.json().get("entry", [])]

    def read(self, resource_type: str, id: str) -> httpx.Response:
        return httpx.get(f"{self.url}/{resource_type}/{id}", timeout=30)
