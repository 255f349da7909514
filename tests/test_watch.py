"""Worklist watch (PS3.18 11.10-11.13, PS3.4 CC.2.3-CC.2.4): subscriptions over HTTP, events received by a real
WebSocket client (PyPI ``websockets``), in order, after a reconnect, for global and filtered global subscribers, and
from a server with two worker processes. Each test works in a partition of its own, so global subscriptions see
only its workitems."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ENGINES
from tests.factory import new_uid
from tests.servers import Server, database_url
from tests.support.oidc.provider import auth_mode, shared_provider
from tests.test_workitems import CANCEL_PROGRESS, PERFORMED, cancel, change_state, create, workitem_dataset

GLOBAL = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL = "1.2.840.10008.5.1.4.34.5.1"
WAIT = 15  # seconds an expected event may take (polling every 0.25 s; a loaded CI machine)


def _partition_base() -> str:
    return f"/v2/partitions/w{new_uid().replace('.', '')[-12:]}"


def _token_headers() -> dict[str, str]:
    """The WebSocket client is not httpx: in DICOMHUB_TEST_AUTH mode it sends the admin token itself."""
    return {"Authorization": f"Bearer {shared_provider().cached_token('admin')}"} if auth_mode() else {}


@contextmanager
def channel(server: Server, base: str, aet: str) -> Iterator[ClientConnection]:
    url = server.url.replace("http", "ws", 1) + f"{base}/subscribers/{aet}"
    with connect(url, additional_headers=_token_headers(), open_timeout=30) as ws:
        yield ws


def receive(ws: ClientConnection, count: int) -> list[dict]:
    return [json.loads(ws.recv(timeout=WAIT)) for _ in range(count)]


def assert_quiet(ws: ClientConnection, seconds: float = 1.0) -> None:
    with pytest.raises(TimeoutError):
        ws.recv(timeout=seconds)


def event(message: dict) -> tuple[str, int, str | None]:
    """(workitem UID, EventTypeID, ProcedureStepState) of an event."""
    state = message.get("00741000", {}).get("Value", [None])[0]
    return message["00001000"]["Value"][0], message["00001002"]["Value"][0], state


def subscribe(http: httpx.Client, base: str, uid: str, aet: str, query: str = "") -> httpx.Response:
    return http.post(f"{base}/workitems/{uid}/subscribers/{aet}{query}")


def new_item(http: httpx.Client, base: str, station: str = "CT_1") -> str:
    uid = new_uid()
    assert create(http, uid, workitem_dataset(station=station), base).status_code == 201
    return uid


def complete(http: httpx.Client, base: str, uid: str, owner: str) -> None:
    path = f"{base}/workitems/{uid}?{owner}"
    headers = {"Content-Type": "application/dicom+json"}
    assert http.post(path, content=json.dumps([PERFORMED]), headers=headers).status_code == 200
    assert change_state(http, uid, "COMPLETED", owner, base).status_code == 200


@pytest.fixture
def partitioned(partitioned_server: Server) -> Iterator[tuple[Server, httpx.Client, str]]:
    with httpx.Client(base_url=partitioned_server.url, timeout=60) as http:
        yield partitioned_server, http, _partition_base()


def test_subscriber_gets_the_initial_report_then_every_event_in_order(partitioned):
    server, http, base = partitioned
    uid, owner = new_item(http, base), new_uid()
    assert subscribe(http, base, uid, "MODALITY1", "?deletionlock=true").status_code == 201
    with channel(server, base, "MODALITY1") as ws:
        initial = receive(ws, 1)[0]
        assert event(initial) == (uid, 1, "SCHEDULED") and initial["00404041"]["Value"] == ["READY"]
        assert change_state(http, uid, "IN PROGRESS", owner, base).status_code == 200
        reason = {
            "00741238": {"vr": "LT", "Value": ["Patient left"]},
            "0074100A": {"vr": "UR", "Value": ["mailto:desk@example.org"]},
            "0074100C": {"vr": "LO", "Value": ["Front desk"]},
        }
        asked = cancel(http, uid, reason, base)
        assert asked.status_code == 202 and "requested" in asked.json()  # a subscriber can act on it: no C312
        complete(http, base, uid, owner)
        claimed, cancel_requested, completed = receive(ws, 3)
        assert event(claimed) == (uid, 1, "IN PROGRESS")
        assert event(cancel_requested) == (uid, 2, None)
        assert cancel_requested["00741238"]["Value"] == ["Patient left"]
        assert cancel_requested["0074100A"]["Value"] == ["mailto:desk@example.org"]
        assert cancel_requested["0074100C"]["Value"] == ["Front desk"]
        assert event(completed) == (uid, 1, "COMPLETED")
        assert_quiet(ws)


def test_missed_events_arrive_after_a_reconnect(partitioned):
    server, http, base = partitioned
    uid, owner = new_item(http, base), new_uid()
    assert subscribe(http, base, uid, "READER").status_code == 201
    with channel(server, base, "READER") as ws:
        assert event(receive(ws, 1)[0]) == (uid, 1, "SCHEDULED")
    assert change_state(http, uid, "IN PROGRESS", owner, base).status_code == 200
    path = f"{base}/workitems/{uid}?{owner}"
    assert (
        http.post(path, content=json.dumps([CANCEL_PROGRESS]), headers={"Content-Type": "application/dicom+json"})
    ).status_code == 200
    assert change_state(http, uid, "CANCELED", owner, base).status_code == 200
    with channel(server, base, "READER") as ws:  # delivered once: the first channel's events are not repeated
        in_progress, canceled = receive(ws, 2)
        assert event(in_progress) == (uid, 1, "IN PROGRESS")
        assert event(canceled) == (uid, 1, "CANCELED")
        assert canceled["0074100E"]["Value"][0]["00080100"]["Value"] == ["110514"]  # the discontinuation reason
        assert_quiet(ws)
    assert http.delete(f"{base}/workitems/{uid}/subscribers/READER").status_code == 200
    second = new_uid()
    assert change_state(http, new_item(http, base), "IN PROGRESS", second, base).status_code == 200
    with channel(server, base, "READER") as ws:
        assert_quiet(ws)


def test_global_filtered_and_suspended_subscriptions(partitioned):
    server, http, base = partitioned
    existing = new_item(http, base, station="CT_1")
    assert subscribe(http, base, GLOBAL, "ALL").status_code == 201
    filtered = subscribe(
        http, base, FILTERED_GLOBAL, "CT_ONLY", "?filter=ScheduledStationNameCodeSequence.CodeValue=CT_9"
    )
    assert filtered.status_code == 201
    with channel(server, base, "ALL") as every, channel(server, base, "CT_ONLY") as ct:
        assert event(receive(every, 1)[0]) == (existing, 1, "SCHEDULED")  # subscribed to what exists
        assert_quiet(ct, 0.5)  # the existing one does not match the filter
        matching, other = new_item(http, base, station="CT_9"), new_item(http, base, station="MR_1")
        assert [event(e) for e in receive(every, 2)] == [(matching, 1, "SCHEDULED"), (other, 1, "SCHEDULED")]
        assert event(receive(ct, 1)[0]) == (matching, 1, "SCHEDULED")
        owner = new_uid()
        assert change_state(http, matching, "IN PROGRESS", owner, base).status_code == 200
        assert event(receive(every, 1)[0]) == (matching, 1, "IN PROGRESS")
        assert event(receive(ct, 1)[0]) == (matching, 1, "IN PROGRESS")

        assert http.post(f"{base}/workitems/{GLOBAL}/subscribers/ALL/suspend").status_code == 200
        later = new_item(http, base, station="CT_9")  # no new automatic subscription for ALL
        assert event(receive(ct, 1)[0]) == (later, 1, "SCHEDULED")
        complete(http, base, matching, owner)  # existing subscriptions stay
        assert event(receive(every, 1)[0]) == (matching, 1, "COMPLETED")
        assert event(receive(ct, 1)[0]) == (matching, 1, "COMPLETED")
        assert_quiet(every, 0.5)

        assert http.delete(f"{base}/workitems/{FILTERED_GLOBAL}/subscribers/CT_ONLY").status_code == 200
        assert change_state(http, later, "IN PROGRESS", new_uid(), base).status_code == 200
        assert_quiet(ct)  # a global unsubscription ends the subscriptions to every workitem too


def test_subscription_refusals(partitioned):
    server, http, base = partitioned
    uid = new_item(http, base)
    unknown = subscribe(http, base, new_uid(), "AE")
    assert unknown.status_code == 404 and unknown.json() == "The workitem instance is not found."
    too_long = subscribe(http, base, uid, "A" * 17)
    assert too_long.status_code == 400 and "1 to 16 printable ASCII characters" in too_long.json()
    assert subscribe(http, base, uid, "AE", "?deletionlock=maybe").status_code == 400
    assert "needs a filter" in subscribe(http, base, FILTERED_GLOBAL, "AE").json()
    assert "is not queryable" in subscribe(http, base, FILTERED_GLOBAL, "AE", "?filter=Modality=CT").json()
    assert "only allowed" in subscribe(http, base, uid, "AE", "?filter=PatientID=1").json()
    none = http.post(f"{base}/workitems/{GLOBAL}/subscribers/NOBODY/suspend")
    assert none.status_code == 404 and "no global subscription" in none.json()
    assert http.post(f"{base}/workitems/{uid}/subscribers/AE/suspend").status_code == 400
    assert http.delete(f"{base}/workitems/{new_uid()}/subscribers/AE").status_code == 404
    for path in (f"{base}/subscribers/{'A' * 17}", "/v2/partitions/never-created/subscribers/AE"):
        with pytest.raises(InvalidStatus) as refused:
            connect(server.url.replace("http", "ws", 1) + path, additional_headers=_token_headers()).close()
        assert refused.value.response.status_code == 400


@pytest.fixture(scope="module", params=ENGINES)
def two_workers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp(f"watch-{request.param}")
    srv = Server(data_dir, database_url(request.param), workers="2").start()
    yield srv
    srv.stop()


def test_two_worker_processes_deliver_every_event_in_order_and_close_cleanly(two_workers):
    """Events written by either process reach the socket held by one of them; SIGTERM closes it with a close frame."""
    base = "/v2"
    aet = "W" + new_uid().replace(".", "")[-10:]
    uids = []
    with httpx.Client(base_url=two_workers.url, timeout=60) as http:
        first = new_item(http, base)
        assert subscribe(http, base, first, aet).status_code == 201
        with channel(two_workers, base, aet) as ws:
            assert event(receive(ws, 1)[0]) == (first, 1, "SCHEDULED")
            for _ in range(6):
                uid = new_item(http, base)
                uids.append(uid)
                assert subscribe(http, base, uid, aet).status_code == 201
                with httpx.Client(base_url=two_workers.url, timeout=60) as fresh:  # new connection: either process
                    assert change_state(fresh, uid, "IN PROGRESS", new_uid(), base).status_code == 200
            expected = [e for uid in uids for e in ((uid, 1, "SCHEDULED"), (uid, 1, "IN PROGRESS"))]
            assert [event(e) for e in receive(ws, len(expected))] == expected
            two_workers.kill(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=WAIT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012)
