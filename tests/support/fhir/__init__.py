"""The loopback FHIR R4 server of the DICOMcast tests (``server.mjs``: npm ``@medplum/fhir-router``, in memory) as a
process the tests start, stop and start again on the same port (its data lives in memory: a restart empties it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
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


OBSERVER = {"X-Test-Observer": "1"}  # the tests' own reads: never given a fault, never in the request log


class FhirServer:
    """``oidc`` (issuer, audience) makes the server require bearer tokens; ``token`` then gives the tests' own."""

    def __init__(
        self,
        log_path: Path,
        oidc: tuple[str, str] | None = None,
        token: Callable[[], str] | None = None,
    ) -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/fhir/R4"
        self.log_path = log_path
        self.oidc = oidc
        self.token = token
        self.process: subprocess.Popen | None = None

    def start(self) -> FhirServer:
        self.process = start_process(
            [*_node_command(), str(HERE / "server.mjs"), str(self.port)],
            self.log_path,
            "FHIR server",
            lambda: answers(f"{self.url}/metadata"),
            cwd=HERE,
            env={**os.environ, **self._oidc_env()},
        )
        return self

    def _oidc_env(self) -> dict[str, str]:
        return {"FHIR_OIDC_ISSUER": self.oidc[0], "FHIR_OIDC_AUDIENCE": self.oidc[1]} if self.oidc else {}

    def _headers(self) -> dict[str, str]:
        return {**OBSERVER, "Authorization": f"Bearer {self.token()}"} if self.token else OBSERVER

    def inject_faults(self, *faults: dict) -> None:
        """Queues faults for the next FHIR requests (server.mjs: ``status``/``retryAfter``, or ``delayMs``; each
        optionally for one ``method`` only)."""
        httpx.post(f"{self.root}/admin/faults", json=list(faults), timeout=10).raise_for_status()

    def requests(self) -> list[dict]:
        """Every FHIR request so far (the tests' own reads excepted): method, url, status, ``at`` (ms), jti."""
        return httpx.get(f"{self.root}/admin/requests", timeout=10).raise_for_status().json()

    def stop(self) -> None:
        stop_process(self.process)

    def search(self, resource_type: str, **params: str) -> list[dict]:
        response = httpx.get(
            f"{self.url}/{resource_type}", params={"_count": "1000", **params}, headers=self._headers(), timeout=30
        )
        response.raise_for_status()
        return [e["resource"] for e in response.json().get("entry", [])]

    def read(self, resource_type: str, id: str) -> httpx.Response:
        return httpx.get(f"{self.url}/{resource_type}/{id}", headers=self._headers(), timeout=30)
