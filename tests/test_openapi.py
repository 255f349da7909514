"""The OpenAPI document describes the API (parameters, bodies, answers), and the server keeps to it under schemathesis.

The structural tests read /openapi.json from a running server; the schemathesis test generates requests from that
document against its own SQLite server (requests may add tags or start operations) and checks that no answer is a
server error and that every status code and content type is one the document declares.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dicomhub import __version__
from tests.conftest import start_server
from tests.factory import make_instance, multipart, new_uid
from tests.servers import Server

QIDO_PATHS = (
    "/studies",
    "/series",
    "/instances",
    "/studies/{study}/series",
    "/studies/{study}/instances",
    "/studies/{study}/series/{series}/instances",
)
PREFIXES = ("/v{version}", "/v{version}/partitions/{partition_name}")


@pytest.fixture
def document(http: httpx.Client) -> dict:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def _parameters(operation: dict, location: str) -> dict[str, dict]:
    return {p["name"]: p for p in operation.get("parameters", ()) if p["in"] == location}


def test_every_path_parameter_is_declared_with_a_schema(document):
    for path, method, operation in _operations(document):
        names = re.findall(r"\{(\w+)\}", path)
        declared = _parameters(operation, "path")
        assert sorted(declared) == sorted(names), (method, path)
        for name in names:
            assert declared[name]["required"] is True
            assert declared[name]["schema"].get("pattern") or declared[name]["schema"].get("enum"), (path, name)
    version = _parameters(document["paths"]["/v{version}/changefeed"]["get"], "path")["version"]
    assert version["schema"]["enum"] == ["1.0-prerelease", "1", "2"]
    uid = _parameters(document["paths"]["/v{version}/studies/{study}"]["get"], "path")["study"]["schema"]
    assert uid["maxLength"] == 64 and re.fullmatch(uid["pattern"], "1.2.840.10008.1.2")
    assert not re.fullmatch(uid["pattern"], "1.02.3")


def test_every_operation_declares_its_answers_and_their_media_types(document):
    for path, method, operation in _operations(document):
        responses = operation["responses"]
        assert "422" not in responses, (method, path)  # FastAPI's validation answer: never given (400 instead)
        assert any(code.startswith("2") for code in responses), (method, path)
        for code, response in responses.items():
            if code in ("204", "304"):
                assert "content" not in response, (method, path, code)
            elif code not in ("404", "406"):  # those two may have no body (Azure's Accept filter, v1 $bulkUpdate)
                assert response["content"], (method, path, code)
        if path.startswith("/v{version}"):  # an unknown version is a 404; errors are plain text (spec 5.14)
            assert "404" in responses, (method, path)
            assert "text/plain" in responses.get("400", {"content": {"text/plain": {}}})["content"], (method, path)
    retrieve = document["paths"]["/v{version}/studies/{study}/series/{series}/instances/{instance}"]["get"]
    assert set(retrieve["responses"]["200"]["content"]) == {
        'multipart/related; type="application/dicom"',
        "application/dicom",
    }
    frames = document["paths"]["/v{version}/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"]
    assert {"image/jp2", "application/octet-stream"} <= set(frames["get"]["responses"]["200"]["content"])
    rendered = document["paths"]["/v{version}/studies/{study}/rendered"]["get"]["responses"]
    assert {"image/jpeg", "image/png", "image/gif"} <= set(rendered["200"]["content"]) and "304" in rendered
    pixeldata = document["paths"]["/v{version}/studies/{study}/pixeldata"]["get"]["responses"]
    assert {"206", "416"} <= set(pixeldata)


def test_query_parameters_and_headers_of_each_route_are_declared(document):
    paths = document["paths"]
    for prefix in PREFIXES:
        for qido in QIDO_PATHS:
            operation = paths[prefix + qido]["get"]
            query = _parameters(operation, "query")
            assert {"limit", "offset", "includefield", "fuzzymatching", "accept"} <= set(query), qido
            assert query["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}
            assert "extended query tag" in operation["description"]  # arbitrary attribute keys are said to work
    studies = _parameters(paths["/v{version}/studies"]["get"], "query")
    assert {"PatientName", "00100010", "StudyDate", "ModalitiesInStudy"} <= set(studies)
    assert "Modality" not in studies  # a series attribute: not a filter of the studies resource
    assert "Modality" in _parameters(paths["/v{version}/series"]["get"], "query")
    rendered = paths["/v{version}/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered"]["get"]
    assert {"quality", "window", "viewport", "accept"} <= set(_parameters(rendered, "query"))
    assert {"Accept", "If-None-Match"} <= set(_parameters(rendered, "header"))
    metadata = paths["/v{version}/studies/{study}/metadata"]["get"]
    assert _parameters(metadata, "query")["bulkdata"]["schema"]["enum"] == ["uri", "omit"]
    assert {"Accept", "If-None-Match", "msdicom-request-original"} <= set(_parameters(metadata, "header"))
    bulkdata = paths["/v{version}/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path}"]["get"]
    assert {"Accept", "Range"} <= set(_parameters(bulkdata, "header"))
    feed = _parameters(paths["/v{version}/changefeed"]["get"], "query")
    assert {"offset", "limit", "startTime", "endTime", "includeMetadata"} <= set(feed)
    assert {"limit", "offset"} <= set(_parameters(paths["/v{version}/extendedquerytags"]["get"], "query"))
    # every retrieve route takes the accept query parameter (PS3.18 8.3.3.1)
    for path, method, operation in _operations(document):
        if (
            method == "get"
            and path.startswith(PREFIXES)
            and "/studies/{study}" in path
            and path.split("/")[-1]
            not in (
                "series",
                "instances",
            )
        ):
            assert "accept" in _parameters(operation, "query"), path


def test_request_bodies_are_declared(document):
    paths = document["paths"]
    for path in (
        "/v{version}/studies",
        "/v{version}/studies/{study}",
        "/v{version}/partitions/{partition_name}/studies",
    ):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True
        assert set(body["content"]) == {'multipart/related; type="application/dicom"', "application/dicom"}
    schemas = document["components"]["schemas"]
    tags = paths["/v{version}/extendedquerytags"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert tags["type"] == "array" and tags["items"] == {"$ref": "#/components/schemas/NewExtendedQueryTag"}
    assert set(schemas["NewExtendedQueryTag"]["required"]) == {"Path", "Level"}
    assert "DS" not in schemas["NewExtendedQueryTag"]["properties"]["VR"]["enum"]  # spec 5.4: the code omits DS
    patch = paths["/v{version}/extendedquerytags/{tag_path}"]["patch"]["requestBody"]["content"]["application/json"]
    assert patch["schema"] == {"$ref": "#/components/schemas/QueryStatusUpdate"}
    update = paths["/v{version}/studies/$bulkUpdate"]["post"]
    assert update["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/BulkUpdateRequest")
    assert schemas["BulkUpdateRequest"]["properties"]["studyInstanceUids"]["maxItems"] == 50
    assert "/v{version}/partitions/{partition_name}/studies/$bulkUpdate" in paths


def test_document_is_valid_openapi(document):
    assert document["openapi"].startswith("3.")
    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.1 meta-schema


def test_root_page_names_the_service_and_links_to_the_docs(http):
    response = http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert f"dicomhub {__version__}" in response.text
    for link in ("/docs", "/openapi.json", "/health/check"):
        assert f'href="{link}"' in response.text
    head = http.head("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/html")


def test_with_authentication_every_route_but_the_open_ones_declares_the_bearer_token(tmp_path_factory):
    srv = start_server(
        tmp_path_factory, "sqlite", auth_enabled="true", auth_authority="http://127.0.0.1:9", auth_audience="dicomhub"
    )
    try:
        document = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    finally:
        srv.stop()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]
    assert (
        document["paths"]["/"]["get"]["security"] == [] and document["paths"]["/health/check"]["get"]["security"] == []
    )
    for path, method, operation in _operations(document):
        if path.startswith("/v{version}"):
            assert "security" not in operation and {"401", "403"} <= set(operation["responses"]), (method, path)
    schemathesis.openapi.from_dict(document).validate()


# -- schemathesis ------------------------------------------------------------------------------------------------------
BOUNDARY = "schemathesis-boundary"
SEEDED = make_instance(frames=3, rows=8, columns=8, PatientName="Fuzz^Seed")
DICOM_BODIES = st.one_of(
    st.just(SEEDED),
    st.builds(lambda cut: SEEDED[:cut], st.integers(0, len(SEEDED))),  # truncated uploads
    st.binary(max_size=512),
)
schemathesis.openapi.media_type("application/dicom", DICOM_BODIES)
schemathesis.openapi.media_type(
    "multipart/related", st.lists(DICOM_BODIES, max_size=3).map(lambda parts: multipart(parts, BOUNDARY)[1])
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A SQLite server of its own (generated requests may add tags and start operations) with one stored
    3-frame instance, whose UIDs the generated requests use half the time."""
    srv = start_server(tmp_path_factory, "sqlite")
    study, series, sop = new_uid(), new_uid(), new_uid()
    stored = httpx.post(
        f"{srv.url}/v2/studies",
        content=make_instance(study=study, series=series, sop=sop, frames=3, rows=8, columns=8),
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"},
    )
    assert stored.status_code == 200, stored.text
    yield srv, {"study": study, "series": series, "instance": sop, "frames": "1,3", "path": "7FE00010"}
    srv.stop()


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(fuzzed_server):
    srv, known = fuzzed_server
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    session = requests.Session()
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 70

    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), use_stored=st.booleans())
        def run(case, use_stored: bool) -> None:
            if use_stored and case.method != "DELETE":  # the stored instance stays for the other operations
                case.path_parameters.update({k: v for k, v in known.items() if k in (case.path_parameters or {})})
            if case.media_type and case.media_type.startswith("multipart/related"):
                case.headers = {**(case.headers or {}), "Content-Type": multipart([], BOUNDARY)[0]}
            case.call_and_validate(base_url=srv.url, session=session, checks=CHECKS)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried; failures are reported together
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
