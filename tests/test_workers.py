"""Several API worker processes on one index (the default on a multi-core machine): stores from many clients land
exactly once, every worker serves what the others stored, /metrics adds up all workers, and every worker writes the
same JSON log lines."""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

import httpx

from tests.factory import make_dataset, make_instance, multipart, new_uid, to_bytes
from tests.servers import Server, database_url

JSON = {"Accept": "application/dicom+json"}


def test_two_workers_share_the_index(tmp_path_factory, request):
    for engine in ("sqlite", "postgres"):
        srv = Server(tmp_path_factory.mktemp(f"workers-{engine}"), database_url(engine), workers="2").start()
        try:
            _exercise(srv)
        finally:
            srv.kill(signal.SIGTERM)


def _exercise(srv: Server) -> None:
    study = new_uid()
    twin = make_instance(study=study)
    errors: list[str] = []
    statuses: list[int] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            content_type, body = multipart([make_instance(study=study) for _ in range(5)])
            response = http.post("/v2/studies", content=body, headers={"Content-Type": content_type, **JSON})
            if response.status_code != 200:
                errors.append(response.text)
            same = http.post("/v2/studies", content=twin, headers={"Content-Type": "application/dicom", **JSON})
            statuses.append(same.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(statuses) == [200] + [409] * 5  # the same instance from six clients is stored once

    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for _ in range(10):  # new connections land on either worker; each sees all 31 instances
            with httpx.Client(base_url=srv.url, timeout=60) as fresh:
                found = fresh.get(f"/v2/studies/{study}/instances", params={"limit": 200}, headers=JSON)
                assert found.status_code == 200 and len(found.json()) == 31
        metrics = http.get("/metrics").text
        stores = re.findall(
            r'dicomhub_http_requests_total\{method="POST",route="/studies",status="(\d+)"\} (\S+)', metrics
        )
        counted = {status: float(value) for status, value in stores}
        assert counted.get("200") == 7.0 and counted.get("409") == 5.0


def test_every_worker_process_logs_json_lines(tmp_path: Path):
    """Request lines and tracebacks of both workers, uvicorn's own lines included, each one JSON object per line."""
    srv = Server(tmp_path, workers="2").start()
    try:
        ds = make_dataset()
        sent = to_bytes(ds)
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            response = http.post("/v2/studies", content=sent, headers={"Content-Type": "application/dicom", **JSON})
            assert response.status_code == 200, response.text
        [blob] = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == len(sent)]
        blob.unlink()  # a file lost under the index: retrieving it is an unexpected error, with a traceback
        instance = f"/v2/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        for _ in range(6):  # new connections, so that both workers take some
            with httpx.Client(base_url=srv.url, timeout=60) as fresh:
                assert fresh.get("/health/check").status_code == 200
                assert fresh.get(instance, headers={"Accept": "application/dicom"}).status_code == 500
    finally:
        srv.kill(signal.SIGTERM)
    lines = srv.log_path.read_text().splitlines()
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    started = [e for e in entries if e["logger"] == "uvicorn.error" and e["message"] == "Application startup complete."]
    assert len({e["process"] for e in started}) == 2
    requests = {(e["method"], e["path"], e["status"]) for e in entries if e["message"] == "request"}
    assert {("POST", "/v2/studies", 200), ("GET", "/health/check", 200), ("GET", instance, 500)} <= requests
    errors = [e for e in entries if e["message"] == "unhandled error"]
    assert len(errors) == 6
    assert all(e["path"] == instance and "Traceback" in e["exception"] for e in errors)
