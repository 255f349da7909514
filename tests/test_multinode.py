"""The multi-node proof: two `dicomhub serve` and two `dicomhub worker` processes on one PostgreSQL index and one S3
store (SeaweedFS), as deploy/ runs them in containers. Concurrent overlapping STOW through both APIs, every instance
through either, no duplicates, a complete ordered change feed, and an export that finishes on the surviving worker
after the other is killed with SIGKILL."""

from __future__ import annotations

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

from dicomhub.blobs.object_store import s3_store
from tests.factory import make_instance, multipart, new_uid
from tests.servers import Server, database_url
from tests.support.object_stores import seaweedfs
from tests.test_bulk_update import wait

ACCEPT_JSON = {"Accept": "application/dicom+json"}


class Worker:
    def __init__(self, env: dict[str, str], log_path) -> None:
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
    common = {"run_operations": "false", "blob_url": blob_url, "operation_lease_seconds": "3"}
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
        deadline = time.monotonic() + 30
        while client.get(f"/v2/operations/{op}").json()["status"] == "notStarted" and time.monotonic() < deadline:
            time.sleep(0.05)
        workers[0].kill()  # SIGKILL, whatever it holds
        done = wait(client, op, timeout=120)
    assert done["status"] == "succeeded" and done["results"]["exported"] == 120, done
    bucket = s3_store("exports", prefix, allow_http=False, env=seaweedfs().env())
    names = [m["path"] for page in obstore.list(bucket) for m in page]
    assert len([n for n in names if n.startswith(f"{op}/results/")]) == 120
    assert os.path.basename(done["results"]["errorHref"]) == "errors.log"
