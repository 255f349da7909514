"""The audit log: one JSON line per request (refused ones too) with who / what / which UIDs, never PHI; whole lines
from several worker processes; lines of answered requests survive a crash; stdout as a destination."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import ENGINES
from tests.factory import make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server, database_url
from tests.support.oidc.provider import OidcProvider, shared_provider

JSON = {"Accept": "application/dicom+json"}
SINGLE = {"Content-Type": "application/dicom", **JSON}
FIELDS = {
    "time",
    "request_id",
    "subject",
    "client_id",
    "roles",
    "action",
    "data_action",
    "method",
    "route",
    "partition",
    "study",
    "series",
    "instance",
    "workitem",
    "query_keys",
    "status",
    "duration_ms",
}


def bearer(oidc: OidcProvider, client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {oidc.cached_token(client)}"}


def audit_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in (server.data_dir / "audit.log").read_text().splitlines()]


def line_of(server: Server, request_id: str) -> dict:
    [line] = [line for line in audit_lines(server) if line["request_id"] == request_id]
    return line


@pytest.fixture(scope="session")
def oidc() -> OidcProvider:
    return shared_provider()


@pytest.fixture(scope="module", params=ENGINES)
def audited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, oidc) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp(f"audit-{request.param}")
    settings = oidc.server_settings(audit_log=str(data_dir / "audit.log"))
    srv = Server(data_dir, database_url(request.param), **settings).start()
    yield srv
    srv.stop()


def test_lines_name_who_did_what_and_hold_no_phi(audited, oidc):
    marker = uuid.uuid4().hex[:12].upper()
    name, patient_id, description = f"ZQ{marker}^Secret", f"PID{marker}", f"Desc{marker}"
    ds = make_dataset(PatientName=name, PatientID=patient_id, StudyDescription=description)
    admin = bearer(oidc, "admin")
    with httpx.Client(base_url=audited.url, timeout=60) as http:
        store = http.post(
            "/v2/studies", content=to_bytes(ds), headers={**SINGLE, **admin, "X-Request-Id": f"store-{marker}"}
        )
        assert store.status_code == 200 and store.headers["x-request-id"] == f"store-{marker}"
        query = http.get(
            "/v2/studies",
            params={"PatientName": name, "PatientID": patient_id, "includefield": "StudyDescription"},
            headers={**JSON, **admin, "X-Request-Id": f"query-{marker}"},
        )
        assert query.status_code == 200 and query.json()[0]["00100020"]["Value"] == [patient_id]
        metadata = http.get(
            f"/v2/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata",
            headers={**JSON, **admin, "X-Request-Id": f"meta-{marker}"},
        )
        assert metadata.status_code == 200
    text = (audited.data_dir / "audit.log").read_text()
    assert marker not in text.replace(f"store-{marker}", "").replace(f"query-{marker}", "").replace(
        f"meta-{marker}", ""
    )

    stored = line_of(audited, f"store-{marker}")
    assert set(stored) >= FIELDS
    assert datetime.fromisoformat(stored["time"]).utcoffset() == timedelta(0)
    assert abs(datetime.fromisoformat(stored["time"]) - datetime.now(UTC)) < timedelta(minutes=5)
    assert (stored["subject"], stored["client_id"], stored["roles"]) == ("admin", "admin", ["globalAdmin"])
    assert (stored["action"], stored["data_action"], stored["method"]) == ("store", "write", "POST")
    assert (stored["route"], stored["partition"], stored["status"]) == ("/v{version}/studies", "Microsoft.Default", 200)
    uids = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "instance": ds.SOPInstanceUID}
    assert stored["instances"] == [{**uids, "stored": True}]
    assert stored["duration_ms"] > 0

    queried = line_of(audited, f"query-{marker}")
    assert queried["action"] == "query" and queried["query_keys"] == ["PatientName", "PatientID", "includefield"]
    read = line_of(audited, f"meta-{marker}")
    assert read["action"] == "retrieve-metadata"
    assert read["route"] == "/v{version}/studies/{study}/series/{series}/metadata"
    assert (read["study"], read["series"], read["instance"]) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, None)


def test_refused_requests_and_refused_instances_are_audited(audited, oidc):
    study = new_uid()
    with httpx.Client(base_url=audited.url, timeout=60) as http:
        anonymous = http.get(f"/v2/studies/{study}/metadata", headers=JSON)
        reader = http.delete(f"/v2/studies/{study}", headers=bearer(oidc, "reader"))
        other_study = make_dataset()  # in a request to another study: refused with its UIDs in the answer
        content_type, body = multipart([to_bytes(other_study)])
        refused = http.post(
            f"/v2/studies/{study}",
            content=body,
            headers={"Content-Type": content_type, **JSON, **bearer(oidc, "admin")},
        )
    assert (anonymous.status_code, reader.status_code, refused.status_code) == (401, 403, 409)

    unauthenticated = line_of(audited, anonymous.headers["x-request-id"])
    assert (unauthenticated["subject"], unauthenticated["status"], unauthenticated["study"]) == (None, 401, study)
    assert unauthenticated["refusal"].startswith("The request needs a bearer token")
    forbidden = line_of(audited, reader.headers["x-request-id"])
    assert (forbidden["subject"], forbidden["action"], forbidden["status"]) == ("reader", "delete", 403)
    assert forbidden["refusal"] == "Authorization failed."
    stow = line_of(audited, refused.headers["x-request-id"])
    assert stow["instances"] == [
        {
            "study": other_study.StudyInstanceUID,
            "series": other_study.SeriesInstanceUID,
            "instance": other_study.SOPInstanceUID,
            "stored": False,
        }
    ]


def test_request_ids_are_checked_and_only_uids_are_written(audited, oidc):
    admin = bearer(oidc, "admin")
    with httpx.Client(base_url=audited.url, timeout=60) as http:
        for given in ("with space", "x" * 129, "naïve"):
            response = http.get("/v2/studies", headers={**JSON, **admin, "X-Request-Id": given.encode()})
            generated = response.headers["x-request-id"]
            assert generated != given and len(generated) == 32
            assert line_of(audited, generated)["status"] == response.status_code
        not_a_uid = http.get("/v2/studies/Smith^John/metadata", headers={**JSON, **admin})
        assert not_a_uid.status_code == 400
    line = line_of(audited, not_a_uid.headers["x-request-id"])
    assert line["study"] is None and "Smith" not in json.dumps(line)


def test_answered_requests_survive_a_crash(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("audit-crash")
    srv = Server(data_dir, auth_enabled="false", audit_log=str(data_dir / "audit.log")).start()
    try:
        answered = httpx.get(f"{srv.url}/v2/studies", headers=JSON, timeout=30)
        srv.kill(signal.SIGKILL)
    finally:
        srv.stop()
    line = line_of(srv, answered.headers["x-request-id"])
    assert (line["status"], line["subject"], line["action"]) == (204, None, "query")  # audit without authentication


def test_worker_processes_write_whole_lines_to_one_file(tmp_path_factory, oidc):
    data_dir = tmp_path_factory.mktemp("audit-workers")
    settings = oidc.server_settings(audit_log=str(data_dir / "audit.log"), workers="2")
    srv = Server(data_dir, **settings).start()
    keys = {f"Key{n:02d}{'x' * 40}": "v" for n in range(60)}  # long lines: about 4 KB each
    sent: list[str] = []
    try:

        def client(number: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                for request in range(30):
                    request_id = f"w{number}-{request}"
                    headers = {**JSON, **bearer(oidc, "admin"), "X-Request-Id": request_id}
                    assert http.get("/v2/studies", params=keys, headers=headers).status_code in (200, 204, 400)
                    sent.append(request_id)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        srv.stop()
    lines = audit_lines(srv)  # every line parses: none was cut or mixed with another
    assert sorted(line["request_id"] for line in lines) == sorted(sent)
    assert all(len(line["query_keys"]) == 60 for line in lines)


def test_stdout_destination(tmp_path_factory, oidc):
    srv = Server(tmp_path_factory.mktemp("audit-stdout"), **oidc.server_settings(audit_log="-")).start()
    try:
        response = httpx.get(
            f"{srv.url}/v2/changefeed", headers={**JSON, **bearer(oidc, "reader"), "X-Request-Id": "to-stdout"}
        )
        assert response.status_code == 200
    finally:
        srv.stop()
    lines = [json.loads(line) for line in srv.log_path.read_text().splitlines() if '"request_id":"to-stdout"' in line]
    assert [(line["action"], line["subject"], line["partition"]) for line in lines] == [("change-feed", "reader", None)]
