"""Authentication, authorization and audit of every request, as plain ASGI in front of the routes.

It runs before routing and FastAPI's validation, so a refused request gets its 401 / 403 whatever else is wrong
with it, and before the body is read, so a refused store reads nothing. The route is found the way the router
finds it (each route's own ``matches``), then its data action in ``actions.ROUTE_ACTIONS``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomhub.auth.actions import METRICS_ROUTE, OPEN_ROUTES, WEBSOCKET, RouteAction, action_for
from dicomhub.auth.audit import STORED_INSTANCES, AuditLog
from dicomhub.auth.roles import BUILT_IN_ROLES, Role, load_roles, permitted, role_names
from dicomhub.auth.tokens import ProviderUnavailable, TokenRejected, TokenVerifier
from dicomhub.config import DEFAULT_PARTITION, Settings
from dicomhub.dicom.uids import is_valid_uid

try:  # FastAPI >= 0.165 keeps included routers as branches; this lists their routes with full paths
    from fastapi.routing import iter_route_contexts
except ImportError:  # older FastAPI copies every included route into app.routes

    def iter_route_contexts(routes: list[Any]) -> list[Any]:
        return routes


log = logging.getLogger("dicomhub.auth")

AUTHORIZATION_FAILED = "Authorization failed."
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_QUERY_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}|[0-9A-Fa-f]{8}(?:\.[0-9A-Fa-f]{8})*")
_PATH_UIDS = ("study", "series", "instance", "workitem")


@dataclass(frozen=True)
class _Route:
    matches: Callable[[Scope], tuple[Match, Scope]]
    template: str
    actions: dict[str, RouteAction | None]  # by method; WEBSOCKET for a WebSocket route


@dataclass
class _Target:
    """What a request aims at: the route template (None when no route has the path) and its data action."""

    template: str | None = None
    method_allowed: bool = False
    action: RouteAction | None = None
    path_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Caller:
    subject: str | None = None
    client_id: str | None = None
    roles: list[str] = field(default_factory=list)


@dataclass
class _Refusal:
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def install_security(app: Any, settings: Settings) -> None:
    """Adds the middleware when authentication or the audit log is on; unusable settings stop the start-up."""
    if not settings.auth_enabled and not settings.audit_log:
        return
    verifier = None
    roles = BUILT_IN_ROLES
    if settings.auth_enabled:
        audiences = [a.strip() for a in (settings.auth_audience or "").split(",") if a.strip()]
        if not settings.auth_authority or not audiences:
            raise ValueError("DICOMHUB_AUTH_ENABLED needs DICOMHUB_AUTH_AUTHORITY and DICOMHUB_AUTH_AUDIENCE.")
        verifier = TokenVerifier(
            settings.auth_authority, audiences, settings.auth_clock_skew, settings.auth_keys_refetch_seconds
        )
        if settings.roles_file is not None:
            roles = load_roles(settings.roles_file)
    app.add_middleware(
        SecurityMiddleware,
        routes_of=app,
        verifier=verifier,
        roles=roles,
        roles_claim=settings.auth_roles_claim,
        metrics_open=not settings.metrics_require_auth,
        audit=AuditLog(settings.audit_log) if settings.audit_log else None,
    )


def app_routes(app: Any) -> list[tuple[Any, set[str]]]:
    """Every route of the app (included routers flattened, full paths) with its methods (WEBSOCKET for a
    WebSocket route)."""
    return [
        (route, set(getattr(route, "methods", None) or {WEBSOCKET})) for route in iter_route_contexts(app.router.routes)
    ]


class SecurityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes_of: Any,
        verifier: TokenVerifier | None,
        roles: dict[str, Role],
        roles_claim: str,
        metrics_open: bool,
        audit: AuditLog | None,
    ) -> None:
        self.app = app
        self.routes_of = routes_of
        self.verifier = verifier
        self.roles = roles
        self.roles_claim = roles_claim
        self.open_routes = OPEN_ROUTES | ({METRICS_ROUTE} if metrics_open else set())
        self.audit = audit
        self._routes: list[_Route] | None = None
        self._startup_fetch: asyncio.Task | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if self.verifier is not None:  # fetched in the background: a provider that is down delays nothing
                self._startup_fetch = asyncio.ensure_future(self.verifier.refresh())
            await self.app(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket") or _is_preflight(scope):
            await self.app(scope, receive, send)  # browsers send CORS preflights without credentials
            return
        target = self._target(scope)
        if target.template in self.open_routes:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        caller, refusal = await self._authorize(scope, target)
        state = scope.setdefault("state", {})  # shared with request.state, where STOW leaves its instances
        status = 500
        audited = False

        def audit() -> None:
            nonlocal audited
            if self.audit is not None and not audited:
                audited = True
                self.audit.write(_audit_entry(scope, target, caller, refusal, state, status, started, request_id))

        async def send_observed(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-Id", request_id)
                if _bodiless(scope, status, headers):
                    audit()  # the head is the whole answer: the client has it once it is sent
            elif kind == "websocket.accept":
                status = 101
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif kind == "websocket.close" and status == 500:
                status = 403  # closed before accepting: uvicorn answers the handshake with a 403
            elif kind == "http.response.body" and not message.get("more_body", False):
                audit()  # handed to the kernel before the answer's last byte
            await send(message)

        try:
            if refusal is None:
                await self.app(scope, receive, send_observed)
            else:
                await _refuse(refusal, scope, receive, send_observed)
        finally:
            audit()

    def _route_table(self) -> list[_Route]:
        """The app's routes with the data action of each method (built at the first request: all routes exist)."""
        if self._routes is None:
            routes = []
            for route, methods in app_routes(self.routes_of):
                actions = {method: action_for(method, route.path) for method in methods}
                routes.append(_Route(route.matches, route.path, actions))
                unmapped = None in actions.values() and route.path not in OPEN_ROUTES | {METRICS_ROUTE}
                if unmapped and self.verifier is not None:
                    log.error("route has no data action: refused to everyone", extra={"route": route.path})
            self._routes = routes
        return self._routes

    def _target(self, scope: Scope) -> _Target:
        method = WEBSOCKET if scope["type"] == "websocket" else scope["method"]
        partial = None
        for route in self._route_table():
            match, child = route.matches(scope)
            if match is Match.FULL:
                return _Target(route.template, True, route.actions.get(method), child.get("path_params", {}))
            if match is Match.PARTIAL and partial is None:
                partial = _Target(route.template, False, None, child.get("path_params", {}))
        return partial or _Target()

    async def _authorize(self, scope: Scope, target: _Target) -> tuple[_Caller | None, _Refusal | None]:
        if self.verifier is None:
            return None, None
        token = _bearer_token(scope)
        if token is None:
            message = "The request needs a bearer token (Authorization: Bearer ...)."
            return None, _Refusal(401, message, {"WWW-Authenticate": "Bearer"})
        try:
            claims = await self.verifier.verify(token)
        except TokenRejected as exc:
            challenge = f'Bearer error="invalid_token", error_description="{exc}"'
            return None, _Refusal(401, str(exc), {"WWW-Authenticate": challenge})
        except ProviderUnavailable as exc:
            return None, _Refusal(503, str(exc), {"Retry-After": str(exc.retry_after)})
        caller = _Caller(
            subject=_text(claims.get("sub")),
            client_id=_text(claims.get("azp") or claims.get("client_id") or claims.get("appid")),
            roles=role_names(claims, self.roles_claim),
        )
        if target.template is None or not target.method_allowed or target.template == METRICS_ROUTE:
            return caller, None  # the app answers 404 / 405 to an authenticated caller; metrics need no role
        action = target.action
        if action is None or not permitted(self.roles, caller.roles, action.data_action, _partition(target)):
            return caller, _Refusal(403, AUTHORIZATION_FAILED)
        return caller, None


async def _refuse(refusal: _Refusal, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.message})
        return
    await PlainTextResponse(refusal.message, refusal.status, refusal.headers)(scope, receive, send)


def _bearer_token(scope: Scope) -> str | None:
    """The token of ``Authorization: Bearer`` (any case), or for a WebSocket the ``access_token`` query
    parameter too: browsers cannot set headers on a WebSocket."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    if scope["type"] == "websocket":
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "access_token":
                return value
    return None


def _is_preflight(scope: Scope) -> bool:
    if scope.get("method") != "OPTIONS":
        return False
    headers = Headers(scope=scope)
    return "origin" in headers and "access-control-request-method" in headers


def _bodiless(scope: Scope, status: int, headers: MutableHeaders) -> bool:
    return status in (204, 304) or status < 200 or scope.get("method") == "HEAD" or headers.get("content-length") == "0"


def _request_id(scope: Scope) -> str:
    given = Headers(scope=scope).get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _partition(target: _Target) -> str | None:
    if target.action is not None and not target.action.partitioned:
        return None
    return target.path_params.get("partition_name") or DEFAULT_PARTITION


def _uid(value: Any) -> str | None:
    """Only UIDs are written: anything else a client put where a UID belongs is left out."""
    return value.rstrip(" \0") if isinstance(value, str) and is_valid_uid(value) else None


def _audit_entry(
    scope: Scope,
    target: _Target,
    caller: _Caller | None,
    refusal: _Refusal | None,
    state: dict[str, Any],
    status: int,
    started: float,
    request_id: str,
) -> dict[str, Any]:
    query = scope.get("query_string", b"").decode("latin-1")
    keys = dict.fromkeys(k for k, _ in parse_qsl(query, keep_blank_values=True) if _QUERY_KEY.fullmatch(k))
    action = target.action if target.method_allowed else None
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        "subject": caller.subject if caller else None,
        "client_id": caller.client_id if caller else None,
        "roles": caller.roles if caller else None,
        "action": action.audit_type if action else None,
        "data_action": action.data_action if action else None,
        "method": scope.get("method", WEBSOCKET),
        "route": target.template,
        "partition": _partition(target) if target.template and action else None,
        **{name: _uid(target.path_params.get(name)) for name in _PATH_UIDS},
        "query_keys": list(keys),
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if refusal is not None:
        entry["refusal"] = refusal.message
    stored = state.get(STORED_INSTANCES)
    if stored is not None:
        entry["instances"] = [{**{k: _uid(i[k]) for k in _PATH_UIDS if k in i}, "stored": i["stored"]} for i in stored]
    return entry
