"""Fixtures: real dicomhub server processes on SQLite and on PostgreSQL, and HTTP clients for them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.servers import Server, database_url
from tests.support.oidc.provider import auth_mode, send_admin_tokens, stop_shared_provider

ENGINES = ["sqlite", "postgres"]

if auth_mode():  # DICOMHUB_TEST_AUTH=1: every test server requires tokens, and the tests send admin tokens
    send_admin_tokens()


@pytest.fixture(scope="session", autouse=True)
def _shared_oidc_provider_stopped() -> Iterator[None]:
    yield
    stop_shared_provider()


def start_server(tmp_path_factory: pytest.TempPathFactory, engine: str, **settings: str) -> Server:
    data_dir = tmp_path_factory.mktemp(f"dicomhub-{engine}")
    return Server(data_dir, database_url(engine), **settings).start()


@pytest.fixture(scope="session", params=ENGINES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A shared server per engine, partitions off. Tests use fresh UIDs, so they do not see each other's data."""
    srv = start_server(tmp_path_factory, request.param)
    yield srv
    srv.stop()


@pytest.fixture(scope="session", params=ENGINES)
def partitioned_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory, request.param, enable_partitions="true")
    yield srv
    srv.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    """An httpx client rooted at the server (paths like ``/v2/studies``)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(params=["v1", "v2"])
def version(request: pytest.FixtureRequest) -> str:
    return request.param
