"""The one map of routes to the data action they need and the audit sub-type they are logged as (spec 5.11).

Routes are looked up by *shape*: the route template after ``/v{version}`` and ``/partitions/{partition_name}``,
with every path parameter and every literal UID segment written ``{}``. So one entry covers a route under every
version and partition, whatever its parameters are named. A versioned route with no entry is refused to everyone
(and ``tests/test_auth.py`` fails until it gets one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WEBSOCKET = "WEBSOCKET"  # the "method" of a WebSocket route in the map

# Open without a token (the metrics endpoint is open unless DICOMHUB_METRICS_REQUIRE_AUTH says otherwise).
OPEN_ROUTES = frozenset({"/", "/health/check", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
METRICS_ROUTE = "/metrics"

_VERSIONED = re.compile(r"^/v\{[^}/]+\}(?:/partitions/\{[^}/]+\}(?=/))?")
_PARAMETER = re.compile(r"^\{[^}]*\}$|^[0-9]+(?:\.[0-9]+)+$")


@dataclass(frozen=True)
class RouteAction:
    data_action: str  # read, write, delete, manageExtendedQueryTags, export
    audit_type: str  # Azure's audit sub-type, or ours for what Azure does not have
    partitioned: bool = True  # acts inside one partition (the default one when the path names none)


def route_shape(template: str) -> str | None:
    """``/v{version}/partitions/{p}/studies/{study}/metadata`` -> ``/studies/{}/metadata``; None if unversioned."""
    versioned = _VERSIONED.match(template)
    if versioned is None:
        return None
    rest = template[versioned.end() :]
    return "/".join("{}" if _PARAMETER.match(segment) else segment for segment in rest.split("/"))


def _entries(methods: str, shapes: tuple[str, ...], action: RouteAction) -> dict[tuple[str, str], RouteAction]:
    return {(method, shape): action for method in methods.split() for shape in shapes}


def _levels(suffix: str = "", instance_only: bool = False) -> tuple[str, ...]:
    instance = "/studies/{}/series/{}/instances/{}"
    if instance_only:
        return (instance + suffix,)
    return ("/studies/{}" + suffix, "/studies/{}/series/{}" + suffix, instance + suffix)


_FRAMES = "/studies/{}/series/{}/instances/{}/frames/{}"
READ, WRITE = "read", "write"
MANAGE_TAGS = "manageExtendedQueryTags"

ROUTE_ACTIONS: dict[tuple[str, str], RouteAction] = {
    # Studies service
    **_entries("POST", ("/studies", "/studies/{}"), RouteAction(WRITE, "store")),
    **_entries("POST", ("/studies/$bulkUpdate", "/studies/$bulkupdate"), RouteAction(WRITE, "update-study")),
    **_entries("GET", (*_levels(), _FRAMES), RouteAction(READ, "retrieve")),
    **_entries("GET", _levels("/metadata"), RouteAction(READ, "retrieve-metadata")),
    **_entries("GET", (*_levels("/rendered"), _FRAMES + "/rendered"), RouteAction(READ, "retrieve-rendered")),
    **_entries("GET", (*_levels("/thumbnail"), _FRAMES + "/thumbnail"), RouteAction(READ, "retrieve-thumbnail")),
    **_entries("GET", _levels("/bulkdata/{}", instance_only=True), RouteAction(READ, "retrieve-bulkdata")),
    **_entries("GET", _levels("/pixeldata"), RouteAction(READ, "retrieve-pixeldata")),
    **_entries(
        "GET",
        (
            "/studies",
            "/series",
            "/instances",
            "/studies/{}/series",
            "/studies/{}/instances",
            "/studies/{}/series/{}/instances",
        ),
        RouteAction(READ, "query"),
    ),
    **_entries("DELETE", _levels(), RouteAction("delete", "delete")),
    # Worklist service (UPS-RS)
    **_entries("POST", ("/workitems",), RouteAction(WRITE, "add-workitem")),
    **_entries("GET", ("/workitems",), RouteAction(READ, "query-workitem")),
    **_entries("GET", ("/workitems/{}",), RouteAction(READ, "retrieve-workitem")),
    **_entries("POST", ("/workitems/{}",), RouteAction(WRITE, "update-workitem")),
    **_entries("PUT", ("/workitems/{}/state",), RouteAction(WRITE, "change-state-workitem")),
    **_entries("POST", ("/workitems/{}/cancelrequest",), RouteAction(WRITE, "cancel-workitem")),
    **_entries("POST", ("/workitems/{}/subscribers/{}",), RouteAction(WRITE, "subscribe-workitem")),
    **_entries("DELETE", ("/workitems/{}/subscribers/{}",), RouteAction(WRITE, "unsubscribe-workitem")),
    **_entries("POST", ("/workitems/{}/subscribers/{}/suspend",), RouteAction(WRITE, "suspend-workitem-subscription")),
    **_entries(WEBSOCKET, ("/subscribers/{}",), RouteAction(READ, "watch-workitems")),
    # bulk transfer
    **_entries("POST", ("/export",), RouteAction("export", "export")),
    **_entries("POST", ("/import",), RouteAction(WRITE, "import")),
    # routes that span partitions
    **_entries("GET", ("/partitions",), RouteAction(READ, "partition", partitioned=False)),
    **_entries("GET", ("/changefeed", "/changefeed/latest"), RouteAction(READ, "change-feed", partitioned=False)),
    **_entries("GET", ("/operations/{}",), RouteAction(READ, "operation", partitioned=False)),
    **_entries("POST", ("/extendedquerytags",), RouteAction(MANAGE_TAGS, "add-extended-query-tag", False)),
    **_entries("GET", ("/extendedquerytags",), RouteAction(READ, "get-all-extended-query-tag", False)),
    **_entries("GET", ("/extendedquerytags/{}",), RouteAction(READ, "get-extended-query-tag", False)),
    **_entries("PATCH", ("/extendedquerytags/{}",), RouteAction(MANAGE_TAGS, "update-extended-query-tag", False)),
    **_entries("DELETE", ("/extendedquerytags/{}",), RouteAction(MANAGE_TAGS, "remove-extended-query-tag", False)),
    **_entries("GET", ("/extendedquerytags/{}/errors",), RouteAction(READ, "get-extended-query-tag-errors", False)),
}


def action_for(method: str, template: str) -> RouteAction | None:
    shape = route_shape(template)
    return None if shape is None else ROUTE_ACTIONS.get((method, shape))
