"""The loopback OpenID provider (``server.mjs``, npm ``oidc-provider``) as a process the tests start and stop.

``DICOMHUB_TEST_AUTH=1`` runs the whole suite with authentication on: every test server is started against one
shared provider and every request a test sends to such a server (httpx, and requests under dicomweb-client)
carries an admin token, added where both libraries send.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import requests

from tests.servers import free_port
from tests.support.processes import answers, start_process, stop_process

HERE = Path(__file__).parent
AUDIENCE = "api://dicomhub"
AUTH_MODE_ENV = "DICOMHUB_TEST_AUTH"


class OidcProvider:
    """One ``node server.mjs PORT`` process; its clients are listed in server.mjs (secret = client id)."""

    def __init__(self, log_path: Path, audience: str = AUDIENCE, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.audience = audience
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._tokens: dict[str, tuple[str, float]] = {}

    def start(self) -> OidcProvider:
        node = shutil.which("node")
        if node is None or not (HERE / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(f"node and {HERE}/node_modules are needed: run `npm ci` there (scripts/test.sh does)")
        self.process = start_process(
            [node, str(HERE / "server.mjs"), str(self.port)],
            self.log_path,
            "oidc provider",
            lambda: answers(f"{self.url}/.well-known/openid-configuration"),
            cwd=HERE,
            env={**os.environ, "OIDC_AUDIENCE": self.audience},
        )
        return self

    def stop(self) -> None:
        stop_process(self.process)

    def server_settings(self, **overrides: str) -> dict[str, str]:
        """dicomhub settings that trust this provider."""
        return {"auth_enabled": "true", "auth_authority": self.url, "auth_audience": self.audience, **overrides}

    def token(self, client: str, **form: str) -> str:
        """A new access token of ``client`` by the client credentials grant (``resource=`` picks the audience)."""
        response = httpx.post(
            f"{self.url}/token",
            data={"grant_type": "client_credentials", **form},
            auth=(client, client),
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def cached_token(self, client: str) -> str:
        """A token of ``client`` reused while it has more than five minutes left."""
        token, expires = self._tokens.get(client, ("", 0.0))
        if time.monotonic() > expires:
            token = self.token(client)
            self._tokens[client] = (token, time.monotonic() + 3600 - 300)
        return token

    def rotate(self) -> str:
        """Publishes a new signing key, signs with it from now on, and returns its kid."""
        return httpx.post(f"{self.url}/admin/rotate", timeout=30).raise_for_status().json()["kid"]


_shared: OidcProvider | None = None
_admin_targets: set[tuple[str, int | None]] = set()


def shared_provider() -> OidcProvider:
    """The provider of this test process, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        _shared = OidcProvider(Path(tempfile.gettempdir()) / f"dicomhub-test-oidc-{os.getpid()}.log").start()
        atexit.register(_shared.stop)
    return _shared


def stop_shared_provider() -> None:
    """Stops the provider of this test process, if it started one (pytest-xdist workers skip atexit handlers)."""
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def auth_mode() -> bool:
    return os.environ.get(AUTH_MODE_ENV) == "1"


def with_auth_mode(url: str, settings: dict[str, str]) -> dict[str, str]:
    """A test server's settings; in auth mode with authentication on (unless the test set it), and the requests
    the tests send it get admin tokens."""
    if not auth_mode() or "auth_enabled" in settings:
        return settings
    parts = urlsplit(url)
    _admin_targets.add((parts.hostname or "", parts.port))
    return {**shared_provider().server_settings(), **settings}


def admin_header_for(url: str) -> str | None:
    """``Bearer {admin token}`` for an auth-mode server at ``url`` (for peers the tests configure: Orthanc, a
    browser); None when the server needs no token."""
    parts = urlsplit(url)
    if _shared is None or (parts.hostname or "", parts.port) not in _admin_targets:
        return None
    return f"Bearer {_shared.cached_token('admin')}"


def send_admin_tokens() -> None:
    """Makes httpx and requests add an admin token to requests for auth-mode servers that carry none."""
    httpx_send = httpx.Client.send
    async_send = httpx.AsyncClient.send
    requests_send = requests.Session.send

    def with_token(headers, url: str) -> None:
        header = admin_header_for(url)
        if header is not None and "authorization" not in headers:  # both header maps ignore case
            headers["Authorization"] = header

    def send(self, request, **kwargs):
        with_token(request.headers, str(request.url))
        return httpx_send(self, request, **kwargs)

    async def send_async(self, request, **kwargs):
        with_token(request.headers, str(request.url))
        return await async_send(self, request, **kwargs)

    def session_send(self, request, **kwargs):
        with_token(request.headers, request.url)
        return requests_send(self, request, **kwargs)

    httpx.Client.send = send
    httpx.AsyncClient.send = send_async
    requests.Session.send = session_send
