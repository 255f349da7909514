"""HTTP clients of DICOMcast: OAuth2 client credentials, and the FHIR R4 client (conditional create, read,
version-aware update and delete, search) with retries of transient failures.

Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential back-off, each wait at most
``MAX_BACKOFF_SECONDS`` (a ``Retry-After`` is honoured up to that cap), so a server back after an outage is used
within seconds; once ``retry_seconds`` have passed the call raises ``TransientError`` and the runner tries the same
entry again later. Any other refusal is a ``FhirError``: the entry is recorded and skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

log = logging.getLogger("dicomhub.cast")

MAX_BACKOFF_SECONDS = 10.0
FHIR_JSON = "application/fhir+json"


class TransientError(Exception):
    """The server could not be reached or asked us to come back later: try the same entry again, not before
    ``wait`` seconds (its ``Retry-After``, capped)."""

    def __init__(self, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


class FhirError(Exception):
    """The FHIR server refused a request for a reason retrying does not change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class PreconditionFailed(FhirError):
    """412: the resource changed since it was read (``If-Match``); read it again and redo the change."""


class ClientCredentials:
    """OAuth2 client-credentials tokens, fetched on first use and again shortly before they expire."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None) -> None:
        self.token_url = token_url
        self.form = {"grant_type": "client_credentials"}
        if scope:
            self.form["scope"] = scope
        self.auth = (client_id, client_secret)
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def header(self, http: httpx.Client, renew: bool = False) -> str:
        with self._lock:
            if renew or self._token is None or time.monotonic() > self._expires:
                try:
                    response = http.post(self.token_url, data=self.form, auth=self.auth)
                except httpx.HTTPError as exc:
                    raise TransientError(f"token endpoint {self.token_url}: {exc}") from exc
                if response.status_code >= 500 or response.status_code == 429:
                    raise TransientError(f"token endpoint {self.token_url}: {response.status_code}")
                if response.status_code != 200:
                    raise FhirError(response.status_code, f"token refused by {self.token_url}: {response.text[:200]}")
                body = response.json()
                self._token = body["access_token"]
                lifetime = float(body.get("expires_in", 300))
                # renewed a little before it expires: a minute early, or a fifth of its life when that is shorter
                self._expires = time.monotonic() + lifetime - min(60.0, lifetime / 5)
            return f"Bearer {self._token}"


def credentials(token_url: str | None, client_id: str | None, secret: str | None, scope: str | None):
    """Client credentials when a token URL is configured, else None (no Authorization header)."""
    if not token_url:
        return None
    if not client_id or secret is None:
        raise ValueError(f"OAuth2 token URL {token_url} is set without a client id and secret")
    return ClientCredentials(token_url, client_id, secret, scope)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


def _message(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome, or the start of the body."""
    try:
        body = response.json()
        issues = body.get("issue", []) if isinstance(body, dict) else []
        texts = [i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", "") for i in issues]
        if any(texts):
            return "; ".join(t for t in texts if t)
    except ValueError:
        pass
    return response.text[:300]


class RetryingClient:
    """httpx with bearer tokens and the retry rules of the module docstring."""

    def __init__(self, base_url: str, auth: ClientCredentials | None, retry_seconds: float, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.retry_seconds = retry_seconds
        self.http = httpx.Client(timeout=timeout, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The response of any status below 500 but 429; transient failures retried until ``retry_seconds``."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.25
        renewed = False
        target = url if url.startswith("http") else f"{self.base_url}/{url.lstrip('/')}"
        while True:
            headers = dict(kwargs.pop("headers", None) or {})
            if self.auth is not None:
                headers["Authorization"] = self.auth.header(self.http)
            kwargs["headers"] = headers
            wait: float | None = delay
            try:
                response = self.http.request(method, target, **kwargs)
            except httpx.HTTPError as exc:
                problem = f"{method} {target}: {type(exc).__name__} {exc}"
            else:
                if response.status_code == 401 and self.auth is not None and not renewed:
                    renewed = True
                    self.auth.header(self.http, renew=True)
                    continue
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"{method} {target}: {response.status_code} {_message(response)}"
                wait = _retry_after(response) or delay
            wait = min(wait, MAX_BACKOFF_SECONDS)
            if time.monotonic() + wait > deadline:
                raise TransientError(problem, wait)
            log.warning("retrying after a transient failure", extra={"problem": problem, "wait": round(wait, 2)})
            time.sleep(wait)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def version_of(resource: dict) -> str | None:
    return (resource.get("meta") or {}).get("versionId")


class FhirClient:
    """The FHIR REST interactions DICOMcast needs; resources are plain dicts."""

    def __init__(
        self,
        base_url: str,
        auth: ClientCredentials | None = None,
        retry_seconds: float = 30.0,
        timeout: float = 30.0,
    ) -> None:
        self.client = RetryingClient(base_url, auth, retry_seconds, timeout)

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, expected: tuple[int, ...], **kwargs: Any) -> httpx.Response:
        headers = {"Accept": FHIR_JSON, **kwargs.pop("headers", {})}
        if "json" in kwargs:
            headers["Content-Type"] = FHIR_JSON
        response = self.client.send(method, path, headers=headers, **kwargs)
        if response.status_code in expected:
            return response
        if response.status_code == 412:
            raise PreconditionFailed(412, f"{method} {path}: {_message(response)}")
        raise FhirError(response.status_code, f"{method} {path}: {_message(response)}")

    def search(self, resource_type: str, params: dict[str, str]) -> list[dict]:
        """Every match (following ``next`` links)."""
        found: list[dict] = []
        response = self._call("GET", resource_type, (200,), params=params)
        while True:
            bundle = response.json()
            found += [
                e["resource"] for e in bundle.get("entry", []) if (e.get("search") or {}).get("mode") != "include"
            ]
            following = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
            if following is None or not bundle.get("entry"):
                return found
            response = self._call("GET", following, (200,))

    def read(self, resource_type: str, id: str) -> dict | None:
        """The resource, or None when it does not exist (404) or was deleted (410)."""
        response = self._call("GET", f"{resource_type}/{id}", (200, 404, 410))
        return response.json() if response.status_code == 200 else None

    def create(self, resource: dict, if_none_exist: str | None = None) -> tuple[dict, bool]:
        """(resource, created): with ``if_none_exist``, the existing match is returned when the search finds one."""
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        response = self._call("POST", resource["resourceType"], (200, 201), json=resource, headers=headers)
        return response.json(), response.status_code == 201

    def update(self, resource: dict) -> dict:
        """PUT with ``If-Match`` on the version read: ``PreconditionFailed`` when someone changed it meanwhile."""
        version = version_of(resource)
        headers = {"If-Match": f'W/"{version}"'} if version else {}
        path = f"{resource['resourceType']}/{resource['id']}"
        return self._call("PUT", path, (200, 201), json=resource, headers=headers).json()

    def delete(self, resource_type: str, id: str) -> None:
        self._call("DELETE", f"{resource_type}/{id}", (200, 202, 204, 404, 410))
