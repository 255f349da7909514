"""The multi-node proof: two `dicomhub serve` and two `dicomhub worker` processes on one PostgreSQL index and one S3
store (SeaweedFS), as deploy/ runs them in containers. Concurrent overlapping STOW through both APIs, every instance
through either, no duplicates, a complete ordered change feed, and an export and a re-index that finish on the
surviving worker after the other is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import obstore
import pytest
import sqlalchemy as sa

from dicomhub.blobs.object_store import s3_store
from tests.factory import make_instance, multipart, new_uid
from tests.servers import Server, database_url
from tests.support.object_stores import seaweedfs
from tests.test_bulk_update import wait
from tests.test_extended_tags import REINDEX_TAGS, add, check_reindexed, engine_of, store_many, wait_for_line

ACCEPT_JSON = {"Accept": "application/dicom+json"}
REINDEX_BATCH = 20  # instances per re-index task


class Worker:
    def __init__(self, env: dict[str, str], log_path) -> None:
        self.env = env
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomhub", "worker"], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = database_url("postgres")
    blob_url = f"s3://dicom/cluster-{uuid.uuid4().hex[:8]}"
    common = {
        "run_operations": "false",
        "blob_url": blob_url,
        "operation_lease_seconds": "3",
        "reindex_batch_size": str(REINDEX_BATCH),
    }
    servers = []
    for n in range(2):
        srv = Server(tmp_path_factory.mktemp(f"node{n}"), db, **common)
        srv.blob_env = {**seaweedfs().env(), "DICOMHUB_BLOB_URL": blob_url}
        servers.append(srv.start())
    workers = []
    for n in range(2):
        env = servers[n].env()
        env.update({"DICOMHUB_DATA_DIR": str(tmp_path_factory.mktemp(f"worker{n}")), "DICOMHUB_RUN_OPERATIONS": "true"})
        env["DICOMHUB_OPERATION_POLL_SECONDS"] = "0.1"
        workers.append(Worker(env, servers[n].data_dir / f"worker{n}.log"))
    yield servers, workers, blob_url
    for worker in workers:
        worker.kill(signal.SIGTERM)
    for srv in servers:
        srv.stop()


def _post(url: str, files: list[bytes]) -> httpx.Response:
    content_type, body = multipart(files)
    with httpx.Client(base_url=url, timeout=120) as client:
        return client.post("/v2/studies", content=body, headers={"Content-Type": content_type, **ACCEPT_JSON})


def test_two_apis_and_two_workers_share_one_index_and_store(cluster):
    servers, workers, blob_url = cluster
    study = new_uid()
    files = [make_instance(study=study) for _ in range(120)]
    # overlapping halves through each API at once: 40 instances go through both
    halves = [files[:80], files[40:]]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(_post, [s.url for s in servers] * 2, halves * 2))
    assert all(a.status_code in (200, 202, 409) for a in answers), [a.text[:200] for a in answers]
    for srv in servers:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            found = client.get(f"/v2/studies/{study}/instances", params={"limit": 200}).json()
            sops = [i["00080018"]["Value"][0] for i in found]
            assert len(sops) == 120 and len(set(sops)) == 120
            for data in files[::30]:
                ds_sop = next(s for s in sops if s.encode() in data)
                series = next(i["0020000E"]["Value"][0] for i in found if i["00080018"]["Value"][0] == ds_sop)
                got = client.get(
                    f"/v2/studies/{study}/series/{series}/instances/{ds_sop}",
                    headers={"Accept": "application/dicom; transfer-syntax=*"},
                )
                assert got.content == data
    with httpx.Client(base_url=servers[1].url, timeout=60) as client:
        feed, offset = [], 0
        while page := client.get("/v1/changefeed", params={"offset": offset, "limit": 100}).json():
            feed += page
            offset = page[-1]["sequence"]
    creates = [e for e in feed if e["studyInstanceUid"] == study and e["action"] == "Create"]
    assert len(creates) == 120 and len({e["sopInstanceUid"] for e in creates}) == 120
    sequences = [e["sequence"] for e in feed]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)

    # an export runs on the workers; one is killed mid-way, the other finishes it
    prefix = f"mn-{uuid.uuid4().hex[:8]}"
    body = {
        "source": {"type": "identifiers", "settings": {"values": [study]}},
        "destination": {"type": "s3", "settings": {"bucket": "exports", "prefix": prefix}},
    }
    with httpx.Client(base_url=servers[0].url, timeout=60) as client:
        response = client.post("/v2/export", json=body)
        assert response.status_code == 202, response.text
        op = response.json()["id"]
        taken_over, _ = _kill_a_task_holder(servers[0], workers, op)
        done = wait(client, op, timeout=120)
    assert done["status"] == "succeeded" and done["results"]["exported"] == 120, done
    assert _tasks(servers[0], op)[taken_over].attempts == 2
    bucket = s3_store("exports", prefix, allow_http=False, env=seaweedfs().env())
    names = [m["path"] for page in obstore.list(bucket) for m in page]
    assert len([n for n in names if n.startswith(f"{op}/results/")]) == 120
    assert os.path.basename(done["results"]["errorHref"]) == "errors.log"


def _replace_dead_workers(workers: list[Worker]) -> None:
    """Starts a new worker in place of each dead one (an earlier test killed it) and waits until it polls."""
    for n, worker in enumerate(workers):
        if worker.process.poll() is not None:
            log_path = worker.log_path.with_name(f"{worker.log_path.stem}-{time.monotonic_ns()}.log")
            workers[n] = Worker(worker.env, log_path)
            wait_for_line(log_path, "operation worker started", timeout=60)


def _kill_a_task_holder(srv: Server, workers: list[Worker], operation_id: str) -> tuple[int, Worker]:
    """Waits for a worker to hold a task of the operation and SIGKILLs it while the task's row is locked, so the task
    can neither finish nor change hands before the kill lands. Returns the task's number and the killed worker."""
    by_pid = {worker.process.pid: worker for worker in workers}
    engine = engine_of(srv)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn, conn.begin():
                held = conn.execute(
                    sa.text(
                        "SELECT number, lease_owner FROM operation_task WHERE operation_id = :id AND status = 0"
                        " AND lease_owner IS NOT NULL LIMIT 1 FOR UPDATE"
                    ),
                    {"id": operation_id},
                ).first()
                if held is not None:
                    victim = by_pid[int(held.lease_owner.split(":")[1])]  # owners are host:pid:nonce
                    victim.kill()
                    return held.number, victim
    finally:
        engine.dispose()
    raise AssertionError(f"no worker held a task of {operation_id} within 30 s")


def _tasks(srv: Server, operation_id: str) -> dict[int, sa.Row]:
    engine = engine_of(srv)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT number, status, attempts, result, lease_owner FROM operation_task WHERE operation_id = :id"
                ),
                {"id": operation_id},
            ).all()
    finally:
        engine.dispose()
    return {row.number: row for row in rows}


def _instance_count(srv: Server) -> int:
    """All instances of the index: the earlier test's as well as this one's."""
    engine = engine_of(srv)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM instance")).scalar_one()
    finally:
        engine.dispose()


def test_a_reindex_finishes_on_the_other_worker_after_a_kill(cluster):
    """An extended query tag is added; a worker holding a re-index task is SIGKILLed, and the other does the rest,
    the dead one's task after its lease: each instance indexed once, found through either API."""
    servers, workers, _ = cluster
    _replace_dead_workers(workers)
    count = 300
    with (
        httpx.Client(base_url=servers[0].url, timeout=60) as first,
        httpx.Client(base_url=servers[1].url, timeout=60) as second,
    ):
        studies = store_many(second, count)
        operation_id = add(first, REINDEX_TAGS).rsplit("/", 1)[1]
        taken_over, victim = _kill_a_task_holder(servers[0], workers, operation_id)
        done = wait(first, operation_id, timeout=120)
        assert done["status"] == "succeeded" and done["percentComplete"] == 100, done
        for srv, http in ((servers[0], first), (servers[1], second)):
            check_reindexed(srv, http, count, studies)
            assert http.get("/v2/extendedquerytags/DeviceSerialNumber").json()["status"] == "ready"
    tasks = _tasks(servers[0], operation_id)
    assert all(row.status == 1 for row in tasks.values())
    results = {number: json.loads(row.result) for number, row in tasks.items()}
    assert sum(result["instances"] for result in results.values()) == _instance_count(servers[0])  # each read once
    (survivor,) = (worker for worker in workers if worker is not victim)
    assert tasks[taken_over].attempts == 2 and results[taken_over]["worker"].endswith(f":{survivor.process.pid}")
    assert all(row.attempts == 1 for number, row in tasks.items() if number != taken_over)
