"""Several API worker processes on one index (the default on a multi-core machine): stores from many clients land
exactly once, every worker serves what the others stored, and /metrics adds up all workers."""

from __future__ import annotations

import re
import signal
import threading

import httpx

from tests.factory import make_instance, multipart, new_uid
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
