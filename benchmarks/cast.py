#!/usr/bin/env python3
"""DICOMcast benchmark (issue 12): change-feed entries cast per second into a FHIR R4 server.

    python benchmarks/cast.py --instances 10000 --output results.md

Starts a fresh ``dicomhub serve`` (SQLite, or --database-url) and the test FHIR server (tests/support/fhir: Medplum's
in-memory FhirRouter; `npm ci` there first), stores tiny instances (10 per study, 5 studies per patient), then runs
the cast of the local index in this process from cursor 0 until its lag is 0. Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from operations import load  # noqa: E402  (the operations benchmark's loader: 10 tiny instances per study)

from dicomhub.cast.runner import build_runner  # noqa: E402
from dicomhub.config import Settings  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.support.fhir import FhirServer  # noqa: E402


def start_archive(data_dir: Path, database_url: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    env.update(DICOMHUB_DATA_DIR=str(data_dir), DICOMHUB_WORKERS="2", DICOMHUB_FSYNC="false")
    if database_url:
        env["DICOMHUB_DATABASE_URL"] = database_url
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - owned by the child process
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomhub", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health/check", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("dicomhub did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4, help="parallel STOW requests while loading")
    parser.add_argument("--database-url", help="PostgreSQL index (default: SQLite in a temporary folder)")
    parser.add_argument("--output", help="append the Markdown result here too")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dicomhub-cast-bench-") as folder:
        data_dir = Path(folder)
        fhir = FhirServer(data_dir / "fhir.log").start()
        archive, url = start_archive(data_dir, args.database_url)
        try:
            print(f"loading {args.instances} instances", file=sys.stderr)
            stow_rate = load(url, args.instances, args.threads)
            settings = Settings(
                data_dir=data_dir,
                database_url=args.database_url,
                cast_fhir_url=fhir.url,
                cast_dicomweb_url=f"{url}/v2",
                cast_poll_seconds=0.2,
            )
            runner = build_runner(settings)
            stop = threading.Event()
            started = time.perf_counter()
            thread = threading.Thread(target=runner.run, args=(stop,))
            thread.start()
            while (status := runner.status())["lagEntries"] > 0 or status["cursor"] == 0:
                time.sleep(0.2)
            elapsed = time.perf_counter() - started
            stop.set()
            thread.join()
        finally:
            archive.terminate()
            archive.wait(30)
            fhir.stop()
    index = "PostgreSQL" if args.database_url else "SQLite"
    rate = status["cursor"] / elapsed
    lines = [
        f"### DICOMcast: {args.instances:,} instances ({index} index, Medplum in-memory FHIR server)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| STOW load (instances/s, {args.threads} threads) | {stow_rate:,.0f} |",
        f"| entries cast | {status['cursor']:,} in {elapsed:,.1f} s |",
        f"| **entries cast per second** | **{rate:,.1f}** |",
        f"| failures recorded | {len(status['failures'])} |",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "a") as file:
            file.write(report + "\n")
    return 1 if status["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
