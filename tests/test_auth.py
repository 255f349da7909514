"""Authentication and authorization against a real OpenID provider (npm oidc-provider on loopback): every route x
every kind of caller, each way a token can be wrong, key rotation, auth before validation, refused writes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, WebSocket

from dicomhub.app import create_app
from dicomhub.auth.actions import METRICS_ROUTE, OPEN_ROUTES, WEBSOCKET, action_for
from dicomhub.auth.middleware import SecurityMiddleware, app_routes
from dicomhub.auth.roles import BUILT_IN_ROLES, RolesFileError, load_roles, role_names
from dicomhub.auth.tokens import TokenVerifier
from dicomhub.config import Settings
from tests.conftest import ENGINES
from tests.factory import make_dataset, make_instance, multipart, new_uid, to_bytes
from tests.servers import Server, database_url, free_port
from tests.support.oidc.provider import AUDIENCE, OidcProvider, shared_provider

JSON = {"Accept": "application/dicom+json"}
SINGLE = {"Content-Type": "application/dicom", **JSON}
OTHER_AUDIENCE = "api://other"
SECOND_AUDIENCE = "api://second"
ALL_ACTIONS = {"read", "write", "delete", "manageExtendedQueryTags", "export"}
# what each built-in role may do (spec 5.11 and the issue), written out independently of dicomhub.auth.roles
ROLE_CLIENTS = {
    "admin": ALL_ACTIONS,
    "owner": ALL_ACTIONS,
    "writer": ALL_ACTIONS - {"delete"},
    "reader": {"read"},
    "datareader": {"read"},
    "norole": set(),
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def forge(header: dict, claims: dict, sign=lambda signing_input: b"") -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def oidc() -> OidcProvider:
    return shared_provider()


@pytest.fixture(scope="session")
def tokens(oidc: OidcProvider) -> dict[str, str]:
    """One token per client of the provider, plus the wrong ones every route is tried with."""
    issued = {client: oidc.token(client) for client in ROLE_CLIENTS}
    issued["other-audience"] = oidc.token("admin", resource=OTHER_AUDIENCE)
    issued["malformed"] = "not.a-token"
    foreign_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    admin = claims_of(issued["admin"])
    real_kid = jwt.get_unverified_header(issued["admin"])["kid"]
    issued["foreign-key"] = jwt.encode(admin, foreign_key, algorithm="RS256", headers={"kid": real_kid})
    expiring = oidc.token("shortlived")
    time.sleep(max(0.0, claims_of(expiring)["exp"] - time.time() + 1.1))
    issued["expired"] = expiring
    return issued


@pytest.fixture(scope="module", params=ENGINES)
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, oidc: OidcProvider
) -> Iterator[Server]:
    """Auth on with the built-in roles, no clock skew (so the expired token is expired), two audiences."""
    settings = oidc.server_settings(auth_clock_skew="0", auth_audience=f"{SECOND_AUDIENCE},{AUDIENCE}")
    srv = Server(tmp_path_factory.mktemp(f"auth-{request.param}"), database_url(request.param), **settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def app_route_list(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """(method, template) of every route the app has, so that new routes are covered as they come."""
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("routes")))
    return sorted((method, route.path) for route, methods in app_routes(app) for method in methods)


def protected(routes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(m, t) for m, t in routes if t not in OPEN_ROUTES | {METRICS_ROUTE} and m != "HEAD"]


def spec_action(method: str, template: str) -> str:
    """The data action of spec 5.11, from the method and the path alone."""
    if "/extendedquerytags" in template and method != "GET":
        return "manageExtendedQueryTags"
    if method in ("GET", WEBSOCKET):
        return "read"
    if template.endswith("/export"):
        return "export"
    if method == "DELETE" and "/workitems" not in template:
        return "delete"
    return "write"


def sample_path(template: str) -> str:
    values = {"version": "2", "partition_name": "Microsoft.Default", "frames": "1", "aet": "AET"}
    values |= {"path:path": "00100010", "tag_path": "00100010", "operation_id": str(uuid.uuid4())}
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + values.get(path[start + 1 : end], new_uid()) + path[end + 1 :]
    return path


def status_of(
    http: httpx.Client, server: Server, method: str, path: str, headers: dict[str, str]
) -> tuple[int, httpx.Headers, str]:
    if method == WEBSOCKET:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        try:
            with connect(server.url.replace("http", "ws", 1) + path, additional_headers=headers, open_timeout=30):
                return 101, httpx.Headers(), ""
        except InvalidStatus as refused:
            response = refused.response
            return response.status_code, httpx.Headers(dict(response.headers)), response.body.decode()
    response = http.request(method, path, headers={"Accept": "*/*", **headers})
    return response.status_code, response.headers, response.text


def test_every_route_has_the_data_action_of_the_spec(app_route_list):
    wrong = {
        (method, template): action_for(method, template)
        for method, template in protected(app_route_list)
        if action_for(method, template) is None
        or action_for(method, template).data_action != spec_action(method, template)
    }
    assert not wrong, f"routes without the spec's data action in dicomhub/auth/actions.py: {wrong}"


def test_every_route_of_the_openapi_document_is_enforced(secured, app_route_list):
    document = httpx.get(f"{secured.url}/openapi.json", timeout=30).json()
    listed = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    enforced = {(method, re.sub(r"\{(\w+):\w+\}", r"{\1}", template)) for method, template in app_route_list}
    assert listed <= enforced  # the document writes {path:path} as {path}


def test_every_route_needs_its_data_action(secured, tokens, app_route_list):
    failures = []
    http = httpx.Client(base_url=secured.url, timeout=60)
    for method, template in protected(app_route_list):
        path = sample_path(template)
        action = spec_action(method, template)
        for case in ("none", "malformed", "expired", "foreign-key", "other-audience", *ROLE_CLIENTS):
            headers = {} if case == "none" else bearer(tokens[case])
            status, answer_headers, body = status_of(http, secured, method, path, headers)
            challenge = answer_headers.get("www-authenticate", "")
            if case == "none":
                ok = status == 401 and challenge == "Bearer"
            elif case not in ROLE_CLIENTS:
                ok = status == 401 and challenge.startswith('Bearer error="invalid_token"')
            elif action in ROLE_CLIENTS[case]:
                ok = status not in (401, 403)
            else:
                ok = status == 403 and (method == WEBSOCKET or body == "Authorization failed.")
            if not ok:
                failures.append(f"{method} {template} as {case}: {status} {challenge} {body[:80]}")
    http.close()
    assert not failures, "\n".join(failures)


def wrong_tokens(oidc: OidcProvider, tokens: dict[str, str]) -> dict[str, str]:
    admin_token = tokens["admin"]
    admin = claims_of(admin_token)
    header = jwt.get_unverified_header(admin_token)
    jwk = next(k for k in httpx.get(f"{oidc.url}/jwks", timeout=30).json()["keys"] if k["kid"] == header["kid"])
    public_pem = jwt.PyJWK(jwk).key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input, _, signature = tokens["reader"].rpartition(".")
    reader_header, _ = signing_input.split(".")
    raised = {**claims_of(tokens["reader"]), "roles": ["globalAdmin"]}
    return {
        "garbage": "garbage",
        "three garbage parts": "a.b.c",
        "alg none": forge({"alg": "none", "typ": "JWT"}, admin),
        "HS256 keyed with the provider's public key": forge(
            {"alg": "HS256", "typ": "JWT", "kid": header["kid"]},
            admin,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        "unknown kid": jwt.encode(
            admin, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", {"kid": "nobody"}
        ),
        "foreign signature": tokens["foreign-key"],
        "tampered payload": f"{reader_header}.{b64(json.dumps(raised).encode())}.{signature}",
        "expired": tokens["expired"],
        "not yet valid": oidc.token("notyet"),
        "other issuer": oidc.token("otherissuer"),
        "other audience": tokens["other-audience"],
        "no exp": oidc.token("noexp"),
    }


def test_each_way_a_token_can_be_wrong_is_401(secured, oidc, tokens):
    for name, token in wrong_tokens(oidc, tokens).items():
        response = httpx.get(f"{secured.url}/v2/studies", headers={**JSON, **bearer(token)}, timeout=30)
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token", error_description="')
        assert response.headers["content-type"].startswith("text/plain")
    descriptions = {
        "expired": "The token has expired.",
        "not yet valid": "The token is not valid yet.",
        "other issuer": "The token is from another issuer.",
        "other audience": "The token is for another audience.",
        "no exp": "The token has no 'exp' claim.",
        "unknown kid": "The token's signing key is unknown.",
        "alg none": "The token's signing algorithm is not accepted.",
    }
    wrong = wrong_tokens(oidc, tokens)
    for name, text in descriptions.items():
        response = httpx.get(f"{secured.url}/v2/studies", headers={**JSON, **bearer(wrong[name])}, timeout=30)
        assert response.text == text
        assert f'error_description="{text}"' in response.headers["www-authenticate"]


@pytest.mark.parametrize(
    "authorization",
    ["", "Basic YWRtaW46YWRtaW4=", "Bearer", "Token abc"],
    ids=["no header", "basic", "bearer without token", "other scheme"],
)
def test_no_bearer_token_is_401(secured, authorization):
    headers = {**JSON, "Authorization": authorization} if authorization else JSON
    response = httpx.get(f"{secured.url}/v2/studies", headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] in (
        "Bearer",
        'Bearer error="invalid_token", error_description="The token is malformed."',
    )
    if not authorization.lower().startswith("bearer"):
        assert response.headers["www-authenticate"] == "Bearer"


def test_accepted_token_forms(secured, oidc, tokens):
    admin = tokens["admin"]
    for authorization in (f"Bearer {admin}", f"bearer {admin}", f"BEARER {admin}"):
        assert (
            httpx.get(f"{secured.url}/v2/studies", headers={**JSON, "Authorization": authorization}).status_code == 204
        )
    for client in ("ecadmin", "psadmin"):  # ES256 and PS256 signatures
        token = oidc.token(client)
        assert jwt.get_unverified_header(token)["alg"] in ("ES256", "PS256")
        assert httpx.get(f"{secured.url}/v2/studies", headers={**JSON, **bearer(token)}).status_code == 204
    second = oidc.token("admin", resource=SECOND_AUDIENCE)  # a comma list of audiences accepts each
    assert claims_of(second)["aud"] == SECOND_AUDIENCE
    assert httpx.get(f"{secured.url}/v2/studies", headers={**JSON, **bearer(second)}).status_code == 204


def test_role_claim_forms(secured, oidc):
    single = oidc.token("single")  # "roles": "globalReader", a string
    assert claims_of(single)["roles"] == "globalReader"
    assert httpx.get(f"{secured.url}/v2/studies", headers={**JSON, **bearer(single)}).status_code == 204
    assert httpx.post(f"{secured.url}/v2/studies", headers={**SINGLE, **bearer(single)}).status_code == 403
    for client in ("norole", "emptyroles", "unknown", "otherclaim"):
        response = httpx.get(f"{secured.url}/v2/studies", headers={**JSON, **bearer(oidc.token(client))})
        assert (response.status_code, response.text) == (403, "Authorization failed."), client
        assert response.headers["content-type"].startswith("text/plain")


def test_auth_comes_before_validation(secured, tokens):
    reader = bearer(tokens["reader"])
    study = new_uid()
    cases = [
        ("GET", "/v2/studies/not-a-uid/metadata", JSON, b""),  # invalid UID
        ("GET", f"/v2/studies/{study}", {"Accept": "text/html"}, b""),  # unsupported Accept
        ("GET", "/v2/partitions/nowhere/studies", JSON, b""),  # partitions disabled / unknown partition
        ("GET", "/v7/studies", JSON, b""),  # unknown version
        ("POST", "/v2/extendedquerytags", {"Content-Type": "application/json"}, b"{{"),  # malformed body
        ("POST", "/v2/studies/not-a-uid", {"Content-Type": "text/plain"}, b"x"),  # bad UID and media type
        ("DELETE", "/v2/studies/not-a-uid", {}, b""),
        ("PATCH", "/v2/extendedquerytags/nonsense", {"Content-Type": "application/json"}, b"[]"),
        ("POST", "/v2/studies/$bulkUpdate", {"Content-Type": "application/json"}, b"not json"),
    ]
    for method, path, headers, body in cases:
        anonymous = httpx.request(method, secured.url + path, headers=headers, content=body, timeout=30)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        if method != "GET":  # a reader may not write: 403 whatever the request's other faults
            refused = httpx.request(method, secured.url + path, headers={**headers, **reader}, content=body, timeout=30)
            assert (refused.status_code, refused.text) == (403, "Authorization failed."), (method, path)


def staging_files(server: Server) -> set[Path]:
    return {p for p in server.data_dir.rglob("*") if p.is_file() and "staging" in p.parts}


def test_refused_writes_change_nothing(secured, tokens):
    admin, reader, writer = bearer(tokens["admin"]), bearer(tokens["reader"]), bearer(tokens["writer"])
    kept = make_dataset()
    with httpx.Client(base_url=secured.url, timeout=60) as http:
        assert http.post("/v2/studies", content=to_bytes(kept), headers={**SINGLE, **admin}).status_code == 200
        before = staging_files(secured)
        refused = make_dataset()
        content_type, body = multipart([to_bytes(refused), make_instance()])
        stow = http.post("/v2/studies", content=body, headers={"Content-Type": content_type, **JSON, **reader})
        assert (stow.status_code, stow.text) == (403, "Authorization failed.")
        assert staging_files(secured) == before
        found = http.get("/v2/instances", params={"SOPInstanceUID": refused.SOPInstanceUID}, headers={**JSON, **admin})
        assert found.status_code == 204

        instance = (
            f"/v2/studies/{kept.StudyInstanceUID}/series/{kept.SeriesInstanceUID}/instances/{kept.SOPInstanceUID}"
        )
        for path in (f"/v2/studies/{kept.StudyInstanceUID}", instance):
            assert http.delete(path, headers=writer).status_code == 403  # globalWriter: everything but delete
        metadata = http.get(f"/v2/studies/{kept.StudyInstanceUID}/metadata", headers={**JSON, **admin})
        assert metadata.status_code == 200 and metadata.json()[0]["00080018"]["Value"] == [kept.SOPInstanceUID]

        tag = {"path": "00101010", "vr": "AS", "level": "Study"}
        added = http.post("/v2/extendedquerytags", json=[tag], headers=reader)
        assert (added.status_code, added.text) == (403, "Authorization failed.")
        tags = http.get("/v2/extendedquerytags", headers={**JSON, **admin})
        assert all(t["path"] != "00101010" for t in tags.json())
        assert "location" not in added.headers


def test_cors_headers_on_refusals_and_open_preflights(secured, tokens):
    origin = {"Origin": "http://viewer.example"}
    preflight = httpx.options(
        f"{secured.url}/v2/studies",
        headers={
            **origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,accept",
        },
    )
    assert preflight.status_code == 200
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower().split(",")
    for headers, status in (({}, 401), (bearer(tokens["norole"]), 403)):
        response = httpx.get(f"{secured.url}/v2/studies", headers={**origin, **JSON, **headers})
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] in ("*", "http://viewer.example")
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "www-authenticate" in exposed and "x-request-id" in exposed


def test_open_endpoints_and_unknown_paths(secured, tokens):
    for path in ("/", "/health/check", "/openapi.json", "/docs", "/redoc", "/metrics"):
        assert httpx.get(secured.url + path, timeout=30).status_code == 200, path
    unknown = httpx.get(f"{secured.url}/v2/nothing-here", timeout=30)
    assert unknown.status_code == 401  # says nothing about which paths exist
    assert httpx.get(f"{secured.url}/v2/nothing-here", headers=bearer(tokens["norole"])).status_code == 404
    assert httpx.put(f"{secured.url}/v2/studies", headers=bearer(tokens["norole"])).status_code == 405
    assert httpx.options(f"{secured.url}/v2/studies").status_code == 401  # not a preflight: no free pass


ROLES_FILE = {
    "roles": [
        {"name": "globalReader", "dataActions": ["read"], "notDataActions": [], "scopes": ["/"]},
        {"name": "writeOnly", "dataActions": ["*"], "notDataActions": ["read", "delete"], "scopes": ["/"]},
        {"name": "partitionReader", "dataActions": ["read"], "scopes": ["/"], "partitions": ["alpha"]},
    ]
}


@pytest.fixture(scope="module")
def roles_server(tmp_path_factory, oidc) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("auth-roles")
    roles_file = data_dir / "roles.json"
    roles_file.write_text(json.dumps(ROLES_FILE))
    settings = oidc.server_settings(roles_file=str(roles_file), enable_partitions="true")
    srv = Server(data_dir, **settings).start()
    yield srv
    srv.stop()


def test_roles_file_replaces_the_built_in_roles(roles_server, oidc):
    url = roles_server.url
    both = bearer(oidc.token("readerwriter"))  # globalReader + writeOnly: the union of the two
    ds = make_dataset()
    stored = httpx.post(f"{url}/v2/partitions/alpha/studies", content=to_bytes(ds), headers={**SINGLE, **both})
    assert stored.status_code == 200
    assert httpx.get(f"{url}/v2/partitions/alpha/studies", headers={**JSON, **both}).status_code == 200
    assert httpx.delete(f"{url}/v2/partitions/alpha/studies/{ds.StudyInstanceUID}", headers=both).status_code == 403
    admin = httpx.get(f"{url}/v2/partitions/alpha/studies", headers={**JSON, **bearer(oidc.token("admin"))})
    assert admin.status_code == 403  # globalAdmin is not in the file


def test_partition_limited_role(roles_server, oidc):
    limited = bearer(oidc.token("partitionreader"))
    url = roles_server.url
    assert httpx.get(f"{url}/v2/partitions/alpha/studies", headers={**JSON, **limited}).status_code == 200
    for path in ("/v2/partitions/beta/studies", "/v2/changefeed", "/v2/partitions", "/v2/extendedquerytags"):
        response = httpx.get(url + path, headers={**JSON, **limited})
        assert (response.status_code, response.text) == (403, "Authorization failed."), path


def test_roles_claim_setting_and_closed_metrics(tmp_path_factory, oidc):
    settings = oidc.server_settings(auth_roles_claim="groups", metrics_require_auth="true")
    srv = Server(tmp_path_factory.mktemp("auth-claim"), **settings).start()
    try:
        other_claim = bearer(oidc.token("otherclaim"))  # globalAdmin in "groups"
        assert httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **other_claim}).status_code == 204
        assert httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **bearer(oidc.token("admin"))}).status_code == 403
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        metrics = httpx.get(f"{srv.url}/metrics", headers=bearer(oidc.token("norole")))  # a valid token, no role
        assert metrics.status_code == 200 and "dicomhub_http_requests_total" in metrics.text
    finally:
        srv.stop()


def test_provider_down_at_start_is_503_until_it_is_back(tmp_path_factory):
    port = free_port()
    data_dir = tmp_path_factory.mktemp("auth-down")
    late = OidcProvider(data_dir / "oidc.log", port=port)
    settings = late.server_settings(auth_keys_refetch_seconds="1")
    srv = Server(data_dir, **settings).start()  # starts although the provider is not there
    try:
        some_token = shared_provider().token("admin")
        down = httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **bearer(some_token)})
        assert (down.status_code, down.text) == (503, "The authentication provider is unavailable.")
        assert down.headers["retry-after"] == "1"  # seconds until the next fetch
        late.start()
        try:
            token = late.token("admin")
            deadline = time.monotonic() + 20
            while (status := httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **bearer(token)}).status_code) == 503:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            assert status == 204
        finally:
            late.stop()
    finally:
        srv.stop()


def test_rotated_key_is_accepted_without_restart(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("auth-rotate")
    provider = OidcProvider(data_dir / "oidc.log").start()
    refetch = 5  # the default 30 s, shortened for the test
    srv = Server(data_dir, **provider.server_settings(auth_keys_refetch_seconds=str(refetch))).start()
    try:
        old = provider.token("admin")
        assert httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **bearer(old)}).status_code == 204
        rotated = provider.rotate()
        new = provider.token("admin")
        assert jwt.get_unverified_header(new)["kid"] == rotated != jwt.get_unverified_header(old)["kid"]
        rotated_at = time.monotonic()
        while (status := httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **bearer(new)}).status_code) == 401:
            assert time.monotonic() - rotated_at < refetch + 5
            time.sleep(0.5)
        assert status == 204
        assert httpx.get(f"{srv.url}/v2/studies", headers={**JSON, **bearer(old)}).status_code == 204  # still published
    finally:
        srv.stop()
        provider.stop()


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_websocket_takes_the_token_in_the_header_or_the_query(tmp_path_factory, oidc):
    """The worklist watch channel is a WebSocket: browsers cannot set its headers, so ?access_token= counts too."""
    from starlette.testclient import TestClient, WebSocketDenialResponse

    app = FastAPI()

    @app.websocket("/v{version}/subscribers/{aet}")
    async def watch(websocket: WebSocket, aet: str) -> None:
        await websocket.accept()
        await websocket.send_text(aet)
        await websocket.close()

    verifier = TokenVerifier(oidc.url, [AUDIENCE], leeway=5, refetch_interval=30)
    app.add_middleware(
        SecurityMiddleware,
        routes_of=app,
        verifier=verifier,
        roles=BUILT_IN_ROLES,
        roles_claim="roles",
        metrics_open=True,
        audit=None,
    )
    with TestClient(app) as client:
        with client.websocket_connect(f"/v2/subscribers/AET1?access_token={oidc.token('reader')}") as ws:
            assert ws.receive_text() == "AET1"
        with client.websocket_connect("/v2/subscribers/AET2", headers=bearer(oidc.token("reader"))) as ws:
            assert ws.receive_text() == "AET2"
        for query, status in (("", 401), (f"?access_token={oidc.token('norole')}", 403), ("?access_token=x", 401)):
            with (
                pytest.raises(WebSocketDenialResponse) as denied,
                client.websocket_connect(f"/v2/subscribers/A{query}"),
            ):
                pass
            assert denied.value.status_code == status


def test_roles_file_errors(tmp_path):
    path = tmp_path / "roles.json"
    for document, message in (
        ({"roles": [{"name": "x", "dataActions": ["fly"]}]}, "Role 'x' has an unknown data action 'fly'"),
        ({"roles": [{"name": "x", "dataActions": ["read"], "scopes": ["/studies"]}]}, "has a scope other than '/'"),
        ({"roles": [{"name": "x"}, {"name": "x"}]}, "defines role 'x' twice"),
        ({"role": []}, "must be an object with a 'roles' list"),
    ):
        path.write_text(json.dumps(document))
        with pytest.raises(RolesFileError, match=message.replace("(", r"\(")):
            load_roles(path)
    path.write_text(json.dumps({"roles": [{"name": "w", "dataActions": ["*"], "notDataActions": ["Delete"]}]}))
    assert load_roles(path)["w"].actions == BUILT_IN_ROLES["globalWriter"].actions


def test_role_names_from_claims():
    assert role_names({"roles": "a"}, "roles") == ["a"]
    assert role_names({"roles": ["a", 3, "b"]}, "roles") == ["a", "b"]
    assert role_names({"realm_access": {"roles": ["a"]}}, "realm_access.roles") == ["a"]
    assert role_names({"https://example.com/roles": ["a"]}, "https://example.com/roles") == ["a"]
    assert role_names({}, "roles") == []


def test_server_refuses_to_start_without_authority(tmp_path):
    with pytest.raises(ValueError, match="DICOMHUB_AUTH_AUTHORITY and DICOMHUB_AUTH_AUDIENCE"):
        create_app(Settings(data_dir=tmp_path, auth_enabled=True, auth_audience="api://x"))
