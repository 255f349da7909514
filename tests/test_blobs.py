"""The blob backends by URL: start-up refusals, the object-store promise (range reads, streamed multipart uploads,
a failed upload leaves no index row, cleanup), and a large STOW on S3 that never sits in the server's memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import obstore
import pytest

from dicomhub.blobs.base import Staged
from dicomhub.blobs.object_store import ObjectBlobStore, s3_store, store_from_url
from dicomhub.config import DEFAULT_PARTITION, Settings
from dicomhub.services import build_services
from tests.factory import make_instance, new_uid
from tests.servers import Server, free_port
from tests.support.object_stores import azurite, seaweedfs

BACKENDS = ["s3", "azure"]


def _env(backend: str) -> dict[str, str]:
    return seaweedfs().env() if backend == "s3" else azurite().env()


def _url(backend: str) -> str:
    return f"{'s3' if backend == 's3' else 'azure'}://dicom/t-{uuid.uuid4().hex[:8]}"


def _serve_fails(tmp_path, env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DICOMHUB_", "AWS_", "AZURE_"))}
    result = subprocess.run(
        [sys.executable, "-m", "dicomhub", "serve", "--port", str(free_port())],
        env={**base, "DICOMHUB_DATA_DIR": str(tmp_path), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    return " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DICOMHUB_BLOB_URL": "s4://dicom"}, "Unknown storage URL scheme in 's4://dicom'"),
        ({"DICOMHUB_BLOB_URL": "s3://dicom"}, "No S3 credentials for bucket 'dicom'"),
        ({"DICOMHUB_BLOB_URL": "azure://dicom"}, "No Azure credentials for container 'dicom'"),
        ({"DICOMHUB_BLOB_URL": "file://host/x"}, "is not a file:///absolute/path URL"),
    ],
)
def test_a_blob_url_that_cannot_work_stops_start_up(tmp_path, env, message):
    assert message in _serve_fails(tmp_path, env)


def test_an_unreachable_or_missing_store_stops_start_up(tmp_path):
    keys = {k: v for k, v in seaweedfs().env().items() if k != "AWS_ENDPOINT_URL"}
    down = {**keys, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "DICOMHUB_BLOB_URL": "s3://dicom"}
    assert "The blob store s3://dicom cannot be reached" in _serve_fails(tmp_path, down)
    missing = {**seaweedfs().env(), "DICOMHUB_BLOB_URL": "s3://nosuchbucket/x"}
    assert "NoSuchBucket" in _serve_fails(tmp_path, missing)
    plain = {**keys, "AWS_ENDPOINT_URL": "http://storage.example:9000", "DICOMHUB_BLOB_URL": "s3://dicom"}
    assert "DICOMHUB_BLOB_ALLOW_HTTP" in _serve_fails(tmp_path, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_object_store_reads_ranges_and_streams_multipart_uploads(tmp_path, backend):
    blobs = ObjectBlobStore(store_from_url(_url(backend), env=_env(backend)), _url(backend), tmp_path / "staging")
    data = os.urandom(12 * 1024 * 1024 + 7)  # over two upload parts
    staged = Staged(blobs.new_staging_file())
    staged.path.write_bytes(data)
    blobs.put("a/b.dcm", staged)
    assert not staged.path.exists()  # the spool file is consumed
    assert b"".join(blobs.iter_range("a/b.dcm")) == data
    assert b"".join(blobs.iter_range("a/b.dcm", 5_000_000, 3)) == data[5_000_000:5_000_003]
    assert b"".join(blobs.iter_range("a/b.dcm", 100, 3_000_000, chunk=1 << 20)) == data[100:3_000_100]
    assert b"".join(blobs.iter_range("a/b.dcm", 10, 0)) == b""
    with blobs.open("a/b.dcm") as f:
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(1234)
        assert f.read(5) == data[1234:1239]
    blobs.put("small.dcm", Staged(data=bytearray(b"tiny")))
    assert b"".join(blobs.iter_range("small.dcm")) == b"tiny"
    blobs.delete("a/b.dcm")
    blobs.delete("a/b.dcm")  # a missing key is not an error
    with pytest.raises(FileNotFoundError):
        blobs.open("a/b.dcm")
    blobs.health()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_upload_leaves_no_index_row(tmp_path, monkeypatch, backend):
    for key, value in _env(backend).items():
        monkeypatch.setenv(key, value)
    services = build_services(Settings(data_dir=tmp_path, blob_url=_url(backend)))
    partition = services.index.ensure_partition(DEFAULT_PARTITION)
    refused = {**seaweedfs().env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    services.store.blobs.store = s3_store("dicom", None, False, refused)  # every put is refused now
    study = new_uid()
    [result] = services.store.store_many(partition, [Staged(data=bytearray(make_instance(study=study)))], 2, None)
    assert result.failure == 272
    assert services.index.find_instances(partition.key, study) == []
    services.index.engine.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def object_server(request, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp(f"blobs-{request.param}"), None, blob_url=_url(request.param))
    srv.blob_env = {**_env(request.param), "DICOMHUB_BLOB_URL": srv.settings["blob_url"]}
    yield srv.start()
    srv.stop()


def _peak_rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) // 1024


def test_large_instance_streams_both_ways_and_cleanup_removes_it(object_server):
    """A 160 MB instance goes up in parts from the spool file and comes back as a stream: the server's peak RSS
    grows far less than the file; deleting it removes the object from the store."""
    study, series, sop = new_uid(), new_uid(), new_uid()
    data = make_instance(study=study, series=series, sop=sop, rows=4096, columns=4096, frames=5)  # 160 MB
    with httpx.Client(base_url=object_server.url, timeout=300) as client:
        client.get("/health/check")
        before = _peak_rss_mb(object_server.process.pid)

        def chunks():
            for i in range(0, len(data), 1 << 20):
                yield data[i : i + (1 << 20)]

        response = client.post("/v2/studies", content=chunks(), headers={"Content-Type": "application/dicom"})
        assert response.status_code == 200, response.text
        url = f"/v2/studies/{study}/series/{series}/instances/{sop}"
        received = 0
        with client.stream("GET", url, headers={"Accept": "application/dicom; transfer-syntax=*"}) as streamed:
            assert streamed.status_code == 200
            for piece in streamed.iter_bytes():
                assert piece == data[received : received + len(piece)]
                received += len(piece)
        assert received == len(data)
        frame = client.get(f"{url}/frames/3", headers={"Accept": "multipart/related; type=application/octet-stream"})
        assert frame.status_code == 200, frame.text
        assert len(frame.content) > 4096 * 4096 * 2
        grown = _peak_rss_mb(object_server.process.pid) - before
        assert grown < 80, f"peak RSS grew by {grown} MB for a {len(data) >> 20} MB instance"
        [stored] = object_server.blob_files(f"*/{study}/*")
        assert stored.exists()
        assert client.delete(f"/v2/studies/{study}").status_code == 204
        deadline = time.monotonic() + 20
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not stored.exists()
        health = client.get("/health/check").json()
        assert health["overallStatus"] == "Healthy"
    probe_keys = [m["path"] for page in obstore.list(stored.store, prefix=".health") for m in page]
    assert probe_keys == []  # the health probe cleans up after itself


def test_file_system_store_puts_a_batch(tmp_path):
    """put_many writes uploads in memory and moves spooled ones to their keys, in two folders, each readable."""
    from dicomhub.blobs.filesystem import FileSystemBlobStore

    blobs = FileSystemBlobStore(tmp_path / "blobs")
    spooled = Staged(path=blobs.new_staging_file())
    spooled.path.write_bytes(b"spooled")
    items = [("1/a/b/c.1.dcm", Staged(data=bytearray(b"one"))), ("1/a/b/c.2.dcm", spooled)]
    items.append(("1/a/d/e.3.dcm", Staged(data=bytearray(b"three"))))
    blobs.put_many(items)
    for key, content in (("1/a/b/c.1.dcm", b"one"), ("1/a/b/c.2.dcm", b"spooled"), ("1/a/d/e.3.dcm", b"three")):
        with blobs.open(key) as f:
            assert f.read() == content
    assert list(blobs.staging.iterdir()) == []
