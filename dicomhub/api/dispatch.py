"""Direct dispatch of the Studies routes: one lookup in a tree of path segments and a plain call of the endpoint.

FastAPI tries the app's routes one by one (every router is included twice, plain and partitioned) and solves each
endpoint's dependencies per request; on this archive's hot reads that was a third of the time spent in Python per
request. The endpoints of the Studies service all take the same things: string path parameters, the request and
:func:`~dicomhub.api.context.studies_context`. Those are called here directly, with the same exception handlers.

Anything else goes on to FastAPI unchanged: a path no route has (its 404), a method the route lacks (its 405), the
routes with other dependencies, WebSockets. Among several routes that match a path, the one registered first wins,
as in FastAPI (``POST /studies/$bulkUpdate`` before ``POST /studies/{study}``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._exception_handler import wrap_app_handling_exceptions
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomhub.api.context import studies_context
from dicomhub.auth.middleware import iter_route_contexts

_PARAMETER = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")
_REST = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*):path}")


@dataclass
class _Endpoint:
    """One route: its place in FastAPI's order, methods, the route object FastAPI would record, and whether its
    endpoint can be called directly."""

    order: int
    methods: frozenset[str]
    route: Any
    endpoint: Any
    direct: bool
    arguments: tuple[str, ...]  # the path parameters the endpoint itself takes (not ``version``, for example)


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    patterned: list[tuple[re.Pattern[str], tuple[str, ...], _Node]] = field(default_factory=list)
    rest: list[tuple[str, _Node]] = field(default_factory=list)  # ``{name:path}``: every remaining segment
    endpoints: list[_Endpoint] = field(default_factory=list)


def _callable_directly(route: APIRoute) -> bool:
    """The endpoint takes string path parameters, ``request`` and ``ctx`` (the studies context), nothing else: there
    is nothing for FastAPI to validate."""
    dependant = route.dependant
    if dependant.query_params or dependant.header_params or dependant.cookie_params or dependant.body_params:
        return False
    if route.dependencies or [d.call for d in dependant.dependencies] != [studies_context]:
        return False
    path_names = {p.name for p in dependant.path_params}
    for name, parameter in inspect.signature(route.endpoint).parameters.items():
        expected = str if name in path_names else Request if name == "request" else None
        if name != "ctx" and parameter.annotation not in (expected, getattr(expected, "__name__", None)):
            return False
    return True


def _segment_pattern(segment: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """``v{version}`` → ``v([^/]+)`` and its parameter names (Starlette's ``str`` convertor)."""
    pieces = _PARAMETER.split(segment)  # literal, name, literal, name, ..., literal
    regex = "".join(re.escape(piece) if i % 2 == 0 else "([^/]+)" for i, piece in enumerate(pieces))
    return re.compile(regex), tuple(pieces[1::2])


class RouteTree:
    """The app's HTTP routes by path segment."""

    def __init__(self, app: FastAPI) -> None:
        self._root = _Node()
        for order, context in enumerate(iter_route_contexts(app.router.routes)):
            route = getattr(context, "original_route", context)
            template = getattr(context, "path", None)
            if not isinstance(route, APIRoute) or not template:
                continue
            arguments = tuple(p for p in inspect.signature(route.endpoint).parameters if p not in ("request", "ctx"))
            direct = _callable_directly(route)
            endpoint = _Endpoint(order, frozenset(route.methods), route, route.endpoint, direct, arguments)
            self._node(template).endpoints.append(endpoint)

    def _node(self, template: str) -> _Node:
        node = self._root
        for segment in _segments(template):
            rest = _REST.fullmatch(segment)
            if rest is not None:  # last by construction: the path convertor takes the remaining segments
                child = _Node()
                node.rest.append((rest.group(1), child))
                node = child
                break
            if ":" in segment:
                raise ValueError(f"route {template}: only str and path convertors are supported")
            if "{" not in segment:
                node = node.literal.setdefault(segment, _Node())
                continue
            pattern, names = _segment_pattern(segment)
            for known, known_names, child in node.patterned:
                if known.pattern == pattern.pattern and known_names == names:
                    node = child
                    break
            else:
                child = _Node()
                node.patterned.append((pattern, names, child))
                node = child
        return node

    def find(self, path: str, method: str) -> tuple[_Endpoint, dict[str, str]] | None:
        """The route FastAPI would choose for ``method`` on ``path`` (the first registered that matches both) and
        its path parameters; None when no route has the path with that method."""
        best: tuple[_Endpoint, dict[str, str]] | None = None
        for endpoint, params in self._matches(self._root, _segments(path), 0, {}):
            if method in endpoint.methods and (best is None or endpoint.order < best[0].order):
                best = (endpoint, params)
        return best

    def _matches(
        self, node: _Node, segments: list[str], at: int, params: dict[str, str]
    ) -> Iterator[tuple[_Endpoint, dict[str, str]]]:
        if at == len(segments):
            for endpoint in node.endpoints:
                yield endpoint, params
            return
        segment = segments[at]
        child = node.literal.get(segment)
        if child is not None:
            yield from self._matches(child, segments, at + 1, params)
        for pattern, names, child in node.patterned:
            found = pattern.fullmatch(segment)
            if found is not None:
                named = dict(zip(names, found.groups(), strict=True))
                yield from self._matches(child, segments, at + 1, {**params, **named})
        for name, child in node.rest:
            yield from self._matches(child, segments, len(segments), {**params, name: "/".join(segments[at:])})


def _segments(path: str) -> list[str]:
    return path[1:].split("/") if path.startswith("/") and path != "/" else []


class DirectDispatch:
    """Pure ASGI: calls the Studies endpoints itself (see the module's docstring); the rest goes to ``app``."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        self._tree: RouteTree | None = None
        self._handlers: tuple[dict, dict] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._tree is None:  # built at the first request: every route exists by then
            self._tree = RouteTree(self.fastapi)
            # as Starlette's ExceptionMiddleware has them; 500 / Exception stay with the outer ServerErrorMiddleware
            handlers = {k: v for k, v in self.fastapi.exception_handlers.items() if k not in (500, Exception)}
            by_status = {k: v for k, v in handlers.items() if isinstance(k, int)}
            self._handlers = ({k: v for k, v in handlers.items() if not isinstance(k, int)}, by_status)
        found = self._tree.find(get_route_path(scope), scope["method"])
        if found is None or not found[0].direct:
            await self.app(scope, receive, send)
            return
        endpoint, params = found
        scope["path_params"] = params
        scope["route"] = endpoint.route
        scope["starlette.exception_handlers"] = self._handlers
        request = Request(scope, receive)

        async def call(scope: Scope, receive: Receive, send: Send) -> None:
            arguments = {name: params[name] for name in endpoint.arguments}
            response = await endpoint.endpoint(request=request, ctx=await studies_context(request), **arguments)
            await response(scope, receive, send)

        await wrap_app_handling_exceptions(call, request)(scope, receive, send)
