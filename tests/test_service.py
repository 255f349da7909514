"""Operational surface: health check, OpenAPI, CORS for browser viewers, gzip of JSON only, metrics, logs."""

from __future__ import annotations

import json

import httpx

from tests.factory import make_instance, new_uid


def _store(http: httpx.Client, **kwargs) -> None:
    response = http.post(
        "/v2/studies",
        content=make_instance(**kwargs),
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"},
    )
    assert response.status_code == 200, response.text


def test_health_check_reports_each_dependency(http):
    response = http.get("/health/check")
    assert response.status_code == 200
    body = response.json()
    assert body["overallStatus"] == "Healthy"
    assert {d["name"] for d in body["details"]} == {"DicomBlobHealthCheck", "IndexHealthCheck"}
    assert all(d["status"] == "Healthy" for d in body["details"])


def test_openapi_lists_the_dicomweb_routes(http):
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v{version}/studies",
        "/v{version}/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
        "/v{version}/studies/{study}/metadata",
        "/v{version}/series",
        "/v{version}/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
        "/v{version}/studies/{study}/thumbnail",
        "/v{version}/studies/{study}/series/{series}/instances/{instance}/pixeldata",
        "/v{version}/changefeed",
        "/v{version}/extendedquerytags",
        "/v{version}/operations/{operation_id}",
        "/v{version}/studies/$bulkUpdate",
    ):
        assert path in paths
    assert http.get("/docs").status_code == 200


def test_unversioned_routes_do_not_exist(http):
    assert http.get("/studies", headers={"Accept": "application/dicom+json"}).status_code == 404


def test_cors_preflight_and_exposed_headers(http):
    preflight = http.options(
        "/v2/studies",
        headers={
            "Origin": "http://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "accept,if-none-match",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://viewer.example")
    study = new_uid()
    _store(http, study=study)
    response = http.get(
        f"/v2/studies/{study}/metadata", headers={"Origin": "http://viewer.example", "Accept": "application/dicom+json"}
    )
    assert "etag" in response.headers["access-control-expose-headers"].lower()


def test_json_is_gzipped_on_request_but_pixels_never_are(http):
    study = new_uid()
    for _ in range(3):  # a study's metadata over the default DICOMHUB_GZIP_MIN_SIZE (8 KiB)
        _store(http, study=study, rows=64, columns=64, ImageComments="gzip " * 1000)
    raw = http.get(
        f"/v2/studies/{study}/metadata",
        headers={"Accept": "application/dicom+json", "Accept-Encoding": "gzip"},
    )
    assert raw.headers.get("content-encoding") == "gzip"
    assert len(json.loads(raw.content)) == 3  # httpx decodes transparently
    retrieve = http.get(
        f"/v2/studies/{study}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*', "Accept-Encoding": "gzip"},
    )
    assert retrieve.status_code == 200
    assert "content-encoding" not in retrieve.headers
    plain = http.get(
        f"/v2/studies/{study}/metadata", headers={"Accept": "application/dicom+json", "Accept-Encoding": "identity"}
    )
    assert "content-encoding" not in plain.headers
    assert json.loads(plain.content) == json.loads(raw.content)


def test_metrics_count_requests_by_route(http):
    http.get("/health/check")
    text = http.get("/metrics").text
    assert 'dicomhub_http_requests_total{method="GET",route="/health/check",status="200"}' in text


def test_request_log_is_structured_json(server, http):
    http.get("/health/check", headers={"X-Test": "log"})
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("message") == "request" and line.get("path") == "/health/check"]
    assert requests and requests[-1]["status"] == 200 and "ms" in requests[-1]


def test_readme_documents_every_setting():
    """Configuration is by environment variables: each one a user can set must be in the README's table."""
    from pathlib import Path

    from dicomhub.config import Settings

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    variables = [f"DICOMHUB_{name.upper()}" for name in Settings.model_fields]
    missing = [variable for variable in variables if f"`{variable}`" not in readme]
    assert not missing, f"settings missing from README.md: {missing}"
