"""Change feed, v1 (paging by sequence) and v2 (time windows): entry shape, states after create/delete/re-create,
metadata, limits, every 400, partition names, and the ordering guarantee under concurrent stores and deletes.

The session's shared servers also hold other tests' entries, so tests look only at the entries they made: those
after the sequence (or timestamp) of the newest entry seen when they start.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.factory import make_instance, multipart, new_uid
from tests.servers import Server, database_url

DICOM_JSON = {"Accept": "application/dicom+json"}
DEFAULT = "Microsoft.Default"
KEYS = {
    "sequence",
    "partitionName",
    "studyInstanceUid",
    "seriesInstanceUid",
    "sopInstanceUid",
    "action",
    "timestamp",
    "state",
    "metadata",
}
SOP_UID_TAG = "00080018"
PATIENT_NAME_TAG = "00100010"


def store(http: httpx.Client, *parts: bytes, base: str = "/v2") -> None:
    content_type, body = multipart(list(parts))
    response = http.post(f"{base}/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})
    assert response.status_code == 200, response.text


def latest(http: httpx.Client, version: str = "v2", **params) -> dict | None:
    response = http.get(f"/{version}/changefeed/latest", params=params)
    if response.status_code == 204:
        assert response.content == b""
        return None
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def feed(http: httpx.Client, version: str = "v2", **params) -> list[dict]:
    response = http.get(f"/{version}/changefeed", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def mark(http: httpx.Client) -> int:
    """The sequence of the newest entry (0 for an empty feed): a test's own entries come after it."""
    newest = latest(http, "v1", includeMetadata="false")
    return newest["sequence"] if newest else 0


def since(http: httpx.Client, version: str, after: int, **params) -> list[dict]:
    """Every entry after sequence ``after``: v1 by sequence spans, v2 from the first such entry's timestamp."""
    if version == "v1":
        found = feed(http, "v1", offset=after, limit=100, **params)
        assert len(found) < 100
        return found
    first = feed(http, "v1", offset=after, limit=1, includeMetadata="false")
    if not first:
        return []
    return feed(http, "v2", startTime=first[0]["timestamp"], limit=200, **params)


def instance(study: str, series: str, sop: str, **attributes) -> bytes:
    return make_instance(study=study, series=series, sop=sop, **attributes)


def parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), value
    return moment


def test_states_after_create_delete_and_recreate(http, version):
    after = mark(http)
    study, series, sop = new_uid(), new_uid(), new_uid()
    store(http, instance(study, series, sop, PatientName="First^Version"))

    created = latest(http, version)
    assert set(created) == KEYS
    assert created["sequence"] == after + 1
    assert (created["action"], created["state"], created["partitionName"]) == ("Create", "Current", DEFAULT)
    assert (created["studyInstanceUid"], created["seriesInstanceUid"], created["sopInstanceUid"]) == (
        study,
        series,
        sop,
    )
    assert parse_time(created["timestamp"]) <= datetime.now(UTC) + timedelta(seconds=5)
    assert created["metadata"][SOP_UID_TAG] == {"vr": "UI", "Value": [sop]}
    assert created["metadata"][PATIENT_NAME_TAG]["Value"] == [{"Alphabetic": "First^Version"}]

    assert http.delete(f"/v2/studies/{study}/series/{series}/instances/{sop}").status_code == 204
    deleted = latest(http, version)
    assert set(deleted) == KEYS - {"metadata"}  # the instance is gone, so is its metadata
    assert (deleted["sequence"], deleted["action"], deleted["state"]) == (after + 2, "Delete", "Deleted")
    entries = since(http, version, after)
    assert [(e["action"], e["state"]) for e in entries] == [("Create", "Deleted"), ("Delete", "Deleted")]
    assert all("metadata" not in e for e in entries)

    store(http, instance(study, series, sop, PatientName="Second^Version"))
    entries = since(http, version, after)
    assert [(e["sequence"], e["action"], e["state"]) for e in entries] == [
        (after + 1, "Create", "Replaced"),
        (after + 2, "Delete", "Replaced"),
        (after + 3, "Create", "Current"),
    ]
    for entry in entries:  # every entry carries the metadata of the current version
        assert entry["metadata"][PATIENT_NAME_TAG]["Value"] == [{"Alphabetic": "Second^Version"}]
        assert entry["sopInstanceUid"] == sop
    times = [parse_time(e["timestamp"]) for e in entries]
    assert times == sorted(times)


def test_metadata_is_the_instance_metadata_and_can_be_left_out(http, version):
    after = mark(http)
    study, series, sop = new_uid(), new_uid(), new_uid()
    store(http, instance(study, series, sop, StudyDescription="Change feed"))
    wado = http.get(f"/v2/studies/{study}/series/{series}/instances/{sop}/metadata", headers=DICOM_JSON)
    assert wado.status_code == 200
    [entry] = since(http, version, after)
    assert entry["metadata"] == wado.json()[0]
    assert latest(http, version)["metadata"] == wado.json()[0]

    for value in ("false", "False"):
        [entry] = since(http, version, after, includeMetadata=value)
        assert set(entry) == KEYS - {"metadata"}
        assert set(latest(http, version, includeMetadata=value)) == KEYS - {"metadata"}
    [entry] = since(http, version, after, includeMetadata="TRUE")
    assert entry["metadata"] == wado.json()[0]


def test_study_delete_writes_one_entry_per_instance(http, version):
    after = mark(http)
    study, series = new_uid(), new_uid()
    sops = [new_uid() for _ in range(3)]
    store(http, *(instance(study, series, sop) for sop in sops))
    assert http.delete(f"/v2/studies/{study}").status_code == 204
    entries = since(http, version, after)
    assert [e["action"] for e in entries] == ["Create"] * 3 + ["Delete"] * 3
    assert sorted(e["sopInstanceUid"] for e in entries[:3]) == sorted(sops)
    assert sorted(e["sopInstanceUid"] for e in entries[3:]) == sorted(sops)
    assert {e["state"] for e in entries} == {"Deleted"}
    assert [e["sequence"] for e in entries] == list(range(after + 1, after + 7))


def test_v1_pages_by_sequence(http):
    after = mark(http)
    study, series = new_uid(), new_uid()
    sops = [new_uid() for _ in range(12)]
    store(http, *(instance(study, series, sop) for sop in sops))

    page = feed(http, "v1", offset=after)  # default limit 10: sequences after+1 .. after+10
    assert [e["sequence"] for e in page] == list(range(after + 1, after + 11))
    rest = feed(http, "v1", offset=after + 10)
    assert [e["sequence"] for e in rest] == [after + 11, after + 12]
    assert [e["sopInstanceUid"] for e in page + rest] == sops  # stored in request order
    assert [e["sequence"] for e in feed(http, "v1", offset=after + 3, limit=2)] == [after + 4, after + 5]
    assert feed(http, "v1", offset=after + 12) == []
    assert [e["sopInstanceUid"] for e in feed(http, "v1", offset=after, limit=100)] == sops
    prerelease = feed(http, "v1.0-prerelease", offset=after, limit=3, includeMetadata="false")
    assert prerelease == feed(http, "v1", offset=after, limit=3, includeMetadata="false")
    assert [e["sequence"] for e in prerelease] == [after + 1, after + 2, after + 3]
    assert latest(http, "v1.0-prerelease")["sequence"] == after + 12
    # v1 has no time window: the v2 parameters are not read
    assert feed(http, "v1", offset=after, limit=1, startTime="foo")[0]["sequence"] == after + 1


def test_v2_pages_a_time_window(http):
    after = mark(http)
    batches = []
    for size in (2, 3, 2):
        study, series = new_uid(), new_uid()
        sops = [new_uid() for _ in range(size)]
        store(http, *(instance(study, series, sop) for sop in sops))
        batches.append(sops)
        time.sleep(0.01)  # distinct timestamps for distinct requests
    entries = since(http, "v2", after)
    assert [e["sopInstanceUid"] for e in entries] == [s for b in batches for s in b]
    order = [(parse_time(e["timestamp"]), e["sequence"]) for e in entries]
    assert order == sorted(order)
    t1, t2, t3 = (entries[i]["timestamp"] for i in (0, 2, 5))
    assert t1 < t2 < t3

    window = feed(http, "v2", startTime=t2, endTime=t3)  # start inclusive, end exclusive
    assert [e["sopInstanceUid"] for e in window] == batches[1]
    assert [e["sopInstanceUid"] for e in feed(http, "v2", startTime=t2, offset=1, limit=2)] == batches[1][1:]
    assert [e["sopInstanceUid"] for e in feed(http, "v2", startTime=t3)] == batches[2]
    assert feed(http, "v2", startTime=t3, offset=2) == []
    # the same instant in another offset, and a "+" that arrived unencoded (decoded as a space)
    t2_plus_two = (parse_time(t2) + timedelta(hours=2)).replace(tzinfo=None).isoformat() + "+02:00"
    assert feed(http, "v2", startTime=t2_plus_two, endTime=t3) == window
    assert http.get(f"/v2/changefeed?startTime={t2_plus_two}&endTime={t3.replace('+', '%2B')}").json() == window
    assert [e["sopInstanceUid"] for e in feed(http, "v2", startTime=t1, endTime=t2)] == batches[0]
    # v2 keeps (timestamp, sequence) order for latest too
    assert latest(http, "v2")["sopInstanceUid"] == batches[2][-1]


def test_default_and_maximum_limits(http):
    after = mark(http)
    study, series = new_uid(), new_uid()
    store(http, *(instance(study, series, new_uid()) for _ in range(101)))
    first = feed(http, "v1", offset=after, limit=1)[0]
    v2_default = feed(http, "v2", startTime=first["timestamp"], includeMetadata="false")
    assert len(v2_default) == 100
    assert v2_default[0]["sequence"] == after + 1
    everything = feed(http, "v2", startTime=first["timestamp"], limit=200, includeMetadata="false")
    assert [e["sequence"] for e in everything] == list(range(after + 1, after + 102))
    assert len(feed(http, "v1", offset=after)) == 10
    assert len(feed(http, "v1", offset=after, limit=100)) == 100


LIMIT_V1 = "The query parameter 'limit' is invalid. The field limit must be between 1 and 100."
LIMIT_V2 = "The query parameter 'limit' is invalid. The field limit must be between 1 and 200."
OFFSET = "The query parameter 'offset' is invalid. The field offset must be between 0 and 9223372036854775807."


def not_valid(name: str, value: str) -> str:
    return f"The query parameter '{name}' is invalid. The value '{value}' is not valid."


def no_zone(name: str) -> str:
    return f"The query parameter '{name}' is invalid. Date and time value must specify a time zone."


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/v1/changefeed", {"limit": "0"}, LIMIT_V1),
        ("/v1/changefeed", {"limit": "-1"}, LIMIT_V1),
        ("/v1/changefeed", {"limit": "101"}, LIMIT_V1),
        ("/v1.0-prerelease/changefeed", {"limit": "101"}, LIMIT_V1),
        ("/v1/changefeed", {"limit": "blah"}, not_valid("limit", "blah")),
        ("/v2/changefeed", {"limit": "0"}, LIMIT_V2),
        ("/v2/changefeed", {"limit": "-1"}, LIMIT_V2),
        ("/v2/changefeed", {"limit": "201"}, LIMIT_V2),
        ("/v2/changefeed", {"limit": "1.5"}, not_valid("limit", "1.5")),
        ("/v1/changefeed", {"offset": "-1"}, OFFSET),
        ("/v2/changefeed", {"offset": "-1"}, OFFSET),
        ("/v1/changefeed", {"offset": "blah"}, not_valid("offset", "blah")),
        ("/v2/changefeed", {"offset": "92233720368547758070"}, not_valid("offset", "92233720368547758070")),
        ("/v1/changefeed", {"includeMetadata": "0"}, not_valid("includeMetadata", "0")),
        ("/v2/changefeed", {"includemetadata": "true-ish"}, not_valid("includeMetadata", "true-ish")),
        ("/v1/changefeed/latest", {"includeMetadata": "asdf"}, not_valid("includeMetadata", "asdf")),
        ("/v2/changefeed/latest", {"includeMetadata": "1"}, not_valid("includeMetadata", "1")),
        ("/v2/changefeed", {"startTime": "foo"}, not_valid("startTime", "foo")),
        ("/v2/changefeed", {"startTime": "2024-01-01T10:00:00"}, no_zone("startTime")),
        ("/v2/changefeed", {"endTime": "2024-01-01"}, no_zone("endTime")),
        (
            "/v2/changefeed",
            {"startTime": "2024-01-02T00:00:00Z", "endTime": "2024-01-01T00:00:00Z"},
            "The start time '2024-01-02T00:00:00+00:00' must occur strictly before the end time "
            "'2024-01-01T00:00:00+00:00'.",
        ),
        (
            "/v2/changefeed",
            {"startTime": "2024-01-01T01:00:00+01:00", "endTime": "2024-01-01T00:00:00Z"},
            "The start time '2024-01-01T00:00:00+00:00' must occur strictly before the end time "
            "'2024-01-01T00:00:00+00:00'.",
        ),
        (
            "/v2/changefeed",
            {"endTime": "0001-01-01T00:00:00Z"},
            "The start time '0001-01-01T00:00:00+00:00' must occur strictly before the end time "
            "'0001-01-01T00:00:00+00:00'.",
        ),
    ],
)
def test_bad_parameters_are_400_naming_the_problem(http, path, params, message):
    response = http.get(path, params=params)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == message


def test_unknown_version_and_partition_routes_are_not_found(http):
    assert http.get("/v3/changefeed").status_code == 404
    assert http.get("/v2/partitions/Microsoft.Default/changefeed").status_code == 404
    assert http.get("/changefeed").status_code == 404


def test_entries_name_their_partition(partitioned_server: Server):
    tenant = f"feed-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=partitioned_server.url, timeout=60) as http:
        after = mark(http)  # the feed is served without a partition segment even with partitions on
        study, series, sop = new_uid(), new_uid(), new_uid()
        store(http, instance(study, series, sop), base=f"/v2/partitions/{tenant}")
        store(http, instance(study, series, sop), base=f"/v2/partitions/{DEFAULT}")  # same UIDs, other partition
        assert http.delete(f"/v2/partitions/{tenant}/studies/{study}").status_code == 204
        for version in ("v1", "v2"):
            entries = since(http, version, after)
            assert [(e["partitionName"], e["action"], e["state"]) for e in entries] == [
                (tenant, "Create", "Deleted"),
                (DEFAULT, "Create", "Current"),  # the delete in the other partition leaves it alone
                (tenant, "Delete", "Deleted"),
            ]
            assert entries[1]["metadata"][SOP_UID_TAG]["Value"] == [sop]
        assert http.get(f"/v2/partitions/{tenant}/changefeed").status_code == 404


# -- ordering under concurrency --------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Stores small studies and deletes (and re-stores) some of their instances, as fast as it can."""

    def __init__(self, url: str, rounds: int) -> None:
        super().__init__()
        self.url = url
        self.rounds = rounds
        self.creates = 0
        self.deletes = 0
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for n in range(self.rounds):
                study, series = new_uid(), new_uid()
                sops = [new_uid() for _ in range(1 + n % 4)]
                self._expect(self._store(http, study, series, sops), 200, len(sops), 0)
                victim = sops[0]
                self._expect(http.delete(f"/v1/studies/{study}/series/{series}/instances/{victim}"), 204, 0, 1)
                if n % 2:
                    self._expect(self._store(http, study, series, [victim]), 200, 1, 0)
                remaining = len(sops) - (0 if n % 2 else 1)
                if n % 3 == 0 and remaining:
                    self._expect(http.delete(f"/v2/studies/{study}"), 204, 0, remaining)

    def _store(self, http: httpx.Client, study: str, series: str, sops: list[str]) -> httpx.Response:
        content_type, body = multipart([instance(study, series, sop) for sop in sops])
        return http.post("/v2/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})

    def _expect(self, response: httpx.Response, status: int, creates: int, deletes: int) -> None:
        if response.status_code != status:
            self.errors.append(f"{response.request.method} {response.status_code}: {response.text[:200]}")
            return
        self.creates += creates
        self.deletes += deletes


class Reader(threading.Thread):
    """Polls the feed from where it stopped, as a client following the feed would, until told to finish and
    caught up with the newest entry."""

    def __init__(self, url: str, version: str) -> None:
        super().__init__()
        self.url = url
        self.version = version
        self.seen: list[dict] = []
        self.polls = 0
        self.writers_done = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=120) as http:
                while True:
                    finishing = self.writers_done.is_set()
                    moved = self._poll_v1(http) if self.version == "v1" else self._poll_v2(http)
                    self.polls += 1
                    if finishing and not moved:  # all writes were done before this poll found nothing new
                        return
        except BaseException as exc:  # reported by the test thread
            self.failure = exc

    def _poll_v1(self, http: httpx.Client) -> bool:
        last = self.seen[-1]["sequence"] if self.seen else 0
        page = feed(http, "v1", offset=last, limit=100, includeMetadata="false")
        if not page:
            # a span of sequences that never committed (rolled back): skip it once a later entry is visible, as
            # then nothing below that entry can still appear; the page is read again after looking
            newest = latest(http, "v1", includeMetadata="false")
            page = feed(http, "v1", offset=last, limit=100, includeMetadata="false")
            if not page and newest and newest["sequence"] > last + 100:
                self.seen.append({"sequence": last + 100, "skip": True})
                return True
        self.seen.extend(page)
        return bool(page)

    def _poll_v2(self, http: httpx.Client) -> bool:
        page = feed(http, "v2", offset=len(self.seen), limit=200, includeMetadata="false")
        self.seen.extend(page)
        return bool(page)

    def entries(self) -> list[dict]:
        return [e for e in self.seen if not e.get("skip")]


def _identity(entry: dict) -> tuple:
    """What never changes about an entry (its state does)."""
    return tuple(entry[k] for k in ("sequence", "timestamp", "action", "studyInstanceUid", "sopInstanceUid"))


@pytest.mark.parametrize("engine", ["postgres", "sqlite"])
def test_readers_following_the_feed_miss_nothing_under_concurrent_writes(tmp_path_factory, engine):
    srv = Server(tmp_path_factory.mktemp(f"feed-{engine}"), database_url(engine), workers="2").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            assert latest(http, "v1") is None and latest(http, "v2") is None  # an empty feed: 204
            assert feed(http, "v1") == [] and feed(http, "v2") == []
        readers = [Reader(srv.url, "v1"), Reader(srv.url, "v2")]
        writers = [Writer(srv.url, rounds=14) for _ in range(6)]
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join()
        for reader in readers:
            reader.writers_done.set()
            reader.join(timeout=120)
            assert not reader.is_alive()
            assert reader.failure is None, reader.failure
        assert [e for w in writers for e in w.errors] == []

        with httpx.Client(base_url=srv.url, timeout=120) as http:
            final: list[dict] = []
            while page := feed(http, "v2", offset=len(final), limit=200, includeMetadata="false"):
                final.extend(page)
        creates, deletes = sum(w.creates for w in writers), sum(w.deletes for w in writers)
        assert [e["action"] for e in final].count("Create") == creates
        assert [e["action"] for e in final].count("Delete") == deletes

        # each reader saw every entry once, in its version's order
        v1_reader, v2_reader = readers
        by_sequence = sorted(final, key=lambda e: e["sequence"])
        assert [_identity(e) for e in v1_reader.entries()] == [_identity(e) for e in by_sequence]
        assert [_identity(e) for e in v2_reader.entries()] == [_identity(e) for e in final]
        assert v1_reader.polls > 10 and v2_reader.polls > 10  # they did read while the writers ran
        # and the two orders agree: timestamps grow with the sequence
        assert final == by_sequence
        times = [parse_time(e["timestamp"]) for e in final]
        assert times == sorted(times)
    finally:
        srv.kill(signal.SIGTERM)
