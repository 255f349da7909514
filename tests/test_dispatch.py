"""Direct dispatch picks the route FastAPI would pick, and calls only the endpoints it can call as FastAPI does.

FastAPI's rule is the reference: the first route, in the app's order, whose path and method both match. Every route
template is filled with ordinary values and with values that look like other routes' literals, and the tree's
choice is compared with that rule, method by method.
"""

from __future__ import annotations

import itertools
import re

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import Match

from dicomhub.api.dispatch import RouteTree
from dicomhub.app import create_app
from dicomhub.config import Settings

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD")
# values a path parameter may take: ordinary UIDs and names, and words that are literals elsewhere
FILLERS = ("1.2.3", "2", "studies", "series", "instances", "partitions", "$bulkUpdate", "metadata", "frames", "x y")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("dispatch"), enable_partitions=False))


def fastapi_choice(app, path: str, method: str):
    scope = {"type": "http", "path": path, "root_path": "", "method": method}
    for context in iter_route_contexts(app.router.routes):
        match, child = context.matches(scope)
        if match == Match.FULL:
            return getattr(context, "original_route", context), child.get("path_params", {})
    return None, None


def paths_of(app) -> list[str]:
    paths = set()
    for context in iter_route_contexts(app.router.routes):
        template = getattr(context, "path", "") or ""
        template = re.sub(r"{[^}]+:path}", "a/b", template)
        names = re.findall(r"{([^}:]+)}", template)
        for values in itertools.islice(itertools.product(FILLERS, repeat=len(names)), 60):
            path = template
            for name, value in zip(names, values, strict=True):
                path = path.replace("{" + name + "}", value, 1)
            paths.add(path)
    return sorted(paths | {"/", "/v2/studies/", "/v2//studies", "/nowhere", "/v2/studies/1.2/unknown"})


def test_tree_chooses_the_route_fastapi_chooses(app) -> None:
    tree = RouteTree(app)
    checked = 0
    for path in paths_of(app):
        for method in METHODS:
            expected, params = fastapi_choice(app, path, method)
            found = tree.find(path, method)
            if not isinstance(expected, APIRoute):
                assert found is None, (method, path)
                continue
            assert found is not None, (method, path)
            assert found[0].route is expected, (method, path, found[0].route.path, expected.path)
            assert found[1] == params, (method, path)
            checked += 1
    assert checked > 1000


def test_only_studies_endpoints_are_called_directly(app) -> None:
    tree = RouteTree(app)
    direct = {
        (method, e.route.path)
        for node_endpoints in _all_endpoints(tree._root)
        for e in node_endpoints
        if e.direct
        for method in e.methods
    }
    assert ("GET", "/studies/{study}/series/{series}/instances/{instance}/metadata") in direct
    assert ("POST", "/studies") in direct
    assert ("GET", "/studies") in direct
    # routes without the studies context stay with FastAPI
    assert not any(path.startswith("/health") or "extendedquerytags" in path.lower() for _, path in direct)
    assert not any(path.startswith("/operations") or path == "/" for _, path in direct)


def _all_endpoints(node):
    yield node.endpoints
    for child in node.literal.values():
        yield from _all_endpoints(child)
    for _, _, child in node.patterned:
        yield from _all_endpoints(child)
