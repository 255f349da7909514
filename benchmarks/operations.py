#!/usr/bin/env python3
"""Benchmark of the archive's own APIs (issue 4): change-feed paging, re-index throughput, and QIDO on an extended
query tag against a core tag of the same VR and level. dicomhub only (Orthanc has no equivalent APIs).

    python benchmarks/operations.py --url http://127.0.0.1:18080 --instances 100000 --output results.md

The server must start empty. Instances are tiny (no pixel data) so that the numbers measure the index, not I/O.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import platform
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

BOUNDARY = "dicomhub-operations-bench"
INSTANCES_PER_STUDY = 10
VALUES = 1000  # distinct InstitutionName / StudyDescription values: each matches studies / VALUES studies


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def instance(study: str, series: str, number: int) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = _uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = f"P{number % 5000}"
    ds.PatientName = f"Bench^Patient{number % 5000}"
    ds.StudyDate = "20240101"
    ds.Modality = "OT"
    ds.StudyDescription = f"DESC-{number % VALUES:04d}"
    ds.InstitutionName = f"INST-{number % VALUES:04d}"
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def stow_batch(client: httpx.Client, study_number: int) -> None:
    study, series = _uid(), _uid()
    parts = [instance(study, series, study_number) for _ in range(INSTANCES_PER_STUDY)]
    body = (
        b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
        + f"--{BOUNDARY}--\r\n".encode()
    )
    response = client.post(
        "/v2/studies",
        content=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'},
    )
    response.raise_for_status()


def load(url: str, instances: int, threads: int) -> float:
    studies = instances // INSTANCES_PER_STUDY
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as client, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for i, _ in enumerate(pool.map(lambda n: stow_batch(client, n), range(studies))):
            if i % 500 == 0:
                print(f"  stored {i * INSTANCES_PER_STUDY}/{instances}", file=sys.stderr)
    return studies * INSTANCES_PER_STUDY / (time.perf_counter() - started)


def page_change_feed(client: httpx.Client, version: str, limit: int, metadata: bool) -> tuple[int, float]:
    """Reads the whole feed page by page, as a consumer would; (entries, entries/s)."""
    seen, offset, started = 0, 0, time.perf_counter()
    while True:
        params = {"limit": limit, "includeMetadata": str(metadata).lower()}
        params["offset"] = offset
        page = client.get(f"/{version}/changefeed", params=params).json()
        if not page:
            break
        seen += len(page)
        offset = page[-1]["sequence"] if version == "v1" else offset + len(page)
    return seen, seen / (time.perf_counter() - started)


def reindex(client: httpx.Client, instances: int) -> float:
    started = time.perf_counter()
    response = client.post("/v2/extendedquerytags", json=[{"Path": "InstitutionName", "Level": "Study"}])
    response.raise_for_status()
    href = response.json()["href"]
    while True:
        state = client.get(href).json()
        if state["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.2)
    if state["status"] != "succeeded":
        raise SystemExit(f"re-index ended {state['status']}: {state}")
    return instances / (time.perf_counter() - started)


def qido_medians(client: httpx.Client, rounds: int) -> tuple[float, float]:
    """Median ms of study searches on the extended tag and on the core tag, alternated query by query."""
    rng = random.Random(7)
    extended, core = [], []
    for _ in range(rounds):
        value = f"{rng.randrange(VALUES):04d}"
        for samples, params in (
            (extended, {"InstitutionName": f"INST-{value}"}),
            (core, {"StudyDescription": f"DESC-{value}"}),
        ):
            started = time.perf_counter()
            found = client.get("/v2/studies", params=params, headers={"Accept": "application/dicom+json"})
            samples.append((time.perf_counter() - started) * 1000)
            if found.status_code != 200 or not found.json():
                raise SystemExit(f"QIDO {params} → {found.status_code} {found.text[:200]}")
    return statistics.median(extended), statistics.median(core)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="dicomhub root, e.g. http://127.0.0.1:18080")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4, help="parallel STOW requests while loading")
    parser.add_argument("--rounds", type=int, default=200, help="QIDO queries per tag")
    parser.add_argument("--output", help="write the Markdown table here too")
    parser.add_argument("--index", default="embedded SQLite", help="the server's index, for the report's title")
    parser.add_argument(
        "--phases",
        default="load,changefeed,reindex,qido",
        help="comma list of load, changefeed, reindex, qido (leave out load to measure an already loaded server)",
    )
    args = parser.parse_args(argv)

    phases = set(args.phases.split(","))
    rows = []
    if "load" in phases:
        print(f"loading {args.instances} instances ...", file=sys.stderr)
        rows.append(
            ("STOW while loading (instances/s, 10 per request)", f"{load(args.url, args.instances, args.threads):.0f}")
        )
    with httpx.Client(base_url=args.url, timeout=600) as client:
        for version, limit, metadata in (("v1", 100, False), ("v1", 100, True), ("v2", 200, False), ("v2", 200, True)):
            if "changefeed" not in phases:
                break
            entries, rate = page_change_feed(client, version, limit, metadata)
            if entries != args.instances:
                raise SystemExit(f"change feed {version} returned {entries} entries, expected {args.instances}")
            label = f"change feed {version} paging, limit {limit}, includeMetadata={str(metadata).lower()} (entries/s)"
            rows.append((label, f"{rate:.0f}"))
        if "reindex" in phases:
            rows.append(("re-index of 1 study-level tag (instances/s)", f"{reindex(client, args.instances):.0f}"))
        if "qido" in phases:
            extended, core = qido_medians(client, args.rounds)
            rows.append(("QIDO studies by extended tag InstitutionName (LO), median ms", f"{extended:.2f}"))
            rows.append(("QIDO studies by core tag StudyDescription (LO), median ms", f"{core:.2f}"))
            rows.append(("ratio extended / core", f"{extended / core:.2f}"))
    machine = f"{os.cpu_count()} cores, {platform.system()} {platform.release()}"
    report = (
        f"## Archive APIs: change feed, re-index, extended-tag QIDO (dicomhub only, {args.index})\n\n"
        f"- command: `python benchmarks/operations.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine}; {args.instances} instances, "
        f"{INSTANCES_PER_STUDY} per study, no pixel data; server and client share the machine\n\n"
        "| measure | value |\n|---|---|\n" + "".join(f"| {label} | {value} |\n" for label, value in rows)
    )
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
