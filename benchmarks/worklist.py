#!/usr/bin/env python3
"""Benchmark of the Worklist service (UPS-RS, issue 10): create throughput, the claim + update + complete cycle, and
search latency once the server holds ``--workitems`` workitems. dicomhub only: no peer here has UPS-RS, so the report
gives absolute figures (run it at two sizes to see how they grow).

    python benchmarks/worklist.py --url http://127.0.0.1:18090 --workitems 10000 --output /tmp/worklist.md

The server should start empty (the search phase counts on the data set it made).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import random
import statistics
import sys
import time
import uuid

import httpx

DICOM_JSON = "application/dicom+json"
SEND = {"Content-Type": DICOM_JSON, "Accept": DICOM_JSON}
STATIONS = 20  # distinct ScheduledStationNameCodeSequence code values
PATIENTS_PER_WORKITEM = 2  # a patient has 2 workitems


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _code(value: str) -> dict:
    return {"00080100": {"vr": "SH", "Value": [value]}, "00080104": {"vr": "LO", "Value": [value]}}


def workitem(number: int) -> dict:
    """A complete create dataset (every Type 1 / Type 2 attribute of PS3.4 Table CC.2.5-3)."""
    patient = number // PATIENTS_PER_WORKITEM
    day = 1 + number % 28
    return {
        "00081080": {"vr": "LO"},
        "00081084": {"vr": "SQ"},
        "00081195": {"vr": "UI"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": f"Bench{patient:06d}^Patient"}]},
        "00100020": {"vr": "LO", "Value": [f"WP{patient:06d}"]},
        "00100030": {"vr": "DA"},
        "00100040": {"vr": "CS"},
        "00101002": {"vr": "SQ"},
        "00380010": {"vr": "LO"},
        "00380014": {"vr": "SQ"},
        "00400400": {"vr": "LT"},
        "00404005": {"vr": "DT", "Value": [f"202401{day:02d}{number % 24:02d}0000"]},
        "00404018": {"vr": "SQ", "Value": [_code("PROC")]},
        "00404021": {"vr": "SQ"},
        "00404025": {"vr": "SQ", "Value": [_code(f"STATION{number % STATIONS:02d}")]},
        "00404026": {"vr": "SQ"},
        "00404027": {"vr": "SQ"},
        "00404041": {"vr": "CS", "Value": ["READY"]},
        "0040A370": {
            "vr": "SQ",
            "Value": [
                {
                    "00080050": {"vr": "SH", "Value": [f"ACC{number:08d}"]},
                    "00080051": {"vr": "SQ"},
                    "0020000D": {"vr": "UI", "Value": [_uid()]},
                    "00321060": {"vr": "LO"},
                    "00321064": {"vr": "SQ"},
                    "00400026": {"vr": "SQ"},
                    "00400027": {"vr": "SQ"},
                    "00401001": {"vr": "SH", "Value": [f"RP{number:08d}"]},
                }
            ],
        },
        "00741002": {"vr": "SQ"},
        "00741200": {"vr": "CS", "Value": ["MEDIUM"]},
        "00741204": {"vr": "LO", "Value": ["Bench step"]},
        "00741210": {"vr": "SQ"},
        "00741216": {"vr": "SQ"},
    }


PERFORMED = {
    "00741216": {
        "vr": "SQ",
        "Value": [
            {
                "00404028": {"vr": "SQ", "Value": [_code("STATION00")]},
                "00404050": {"vr": "DT", "Value": ["20240101080000"]},
                "00404019": {"vr": "SQ", "Value": [_code("PROC")]},
                "00404051": {"vr": "DT", "Value": ["20240101090000"]},
                "00404033": {"vr": "SQ"},
            }
        ],
    }
}


def _check(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")


def run_parallel(clients: int, work, items: list) -> float:
    """Seconds for ``work(client, item)`` over ``items`` with ``clients`` threads, one HTTP client each."""
    chunks = [items[i::clients] for i in range(clients)]

    def worker(chunk: list) -> None:
        with httpx.Client(timeout=120) as client:
            for item in chunk:
                work(client, item)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(worker, c) for c in chunks]:
            done.result()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:18090")
    parser.add_argument("--workitems", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=300, help="workitems claimed, updated and completed (timed)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients of the timed writes")
    parser.add_argument("--searches", type=int, default=50, help="requests per search row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", help="write the Markdown report here too")
    args = parser.parse_args()
    base = args.url.rstrip("/") + "/v2"
    rng = random.Random(args.seed)
    numbers = list(range(args.workitems))
    uids = {n: _uid() for n in numbers}

    def create(client: httpx.Client, number: int) -> None:
        body = json.dumps([workitem(number)])
        _check(client.post(f"{base}/workitems?{uids[number]}", content=body, headers=SEND), 201)

    create_seconds = run_parallel(args.clients, create, numbers)
    print(f"created {args.workitems} in {create_seconds:.1f} s", file=sys.stderr)

    def cycle(client: httpx.Client, number: int) -> None:
        uid, owner = uids[number], _uid()
        state = [{"00741000": {"vr": "CS", "Value": ["IN PROGRESS"]}, "00081195": {"vr": "UI", "Value": [owner]}}]
        _check(client.put(f"{base}/workitems/{uid}/state", content=json.dumps(state), headers=SEND), 200)
        body = json.dumps([PERFORMED])
        _check(client.post(f"{base}/workitems/{uid}?{owner}", content=body, headers=SEND), 200)
        state[0]["00741000"]["Value"] = ["COMPLETED"]
        _check(client.put(f"{base}/workitems/{uid}/state", content=json.dumps(state), headers=SEND), 200)

    cycled = rng.sample(numbers, min(args.cycles, args.workitems))
    cycle_seconds = run_parallel(args.clients, cycle, cycled)

    searches = {
        "PatientID (2 matches)": lambda: f"PatientID=WP{rng.randrange(args.workitems // 2):06d}",
        "PatientName fuzzy (2 matches)": lambda: (
            f"PatientName=bench{rng.randrange(args.workitems // 2):06d}&fuzzymatching=true"
        ),
        "AccessionNumber in ReferencedRequestSequence (1)": lambda: (
            f"ReferencedRequestSequence.AccessionNumber=ACC{rng.randrange(args.workitems):08d}"
        ),
        "station code, SCHEDULED, limit 100": lambda: (
            f"ScheduledStationNameCodeSequence.CodeValue=STATION{rng.randrange(STATIONS):02d}"
            "&ProcedureStepState=SCHEDULED&limit=100"
        ),
        "start date-time range (1 day), limit 100": lambda: (
            "ScheduledProcedureStepStartDateTime={0}000000-{0}235959&limit=100".format(
                f"202401{rng.randint(1, 28):02d}"
            )
        ),
        "ProcedureStepState=SCHEDULED, deep offset": lambda: (
            f"ProcedureStepState=SCHEDULED&limit=100&offset={rng.randrange(max(1, args.workitems - 400))}"
        ),
    }
    rows = []
    with httpx.Client(timeout=120, headers={"Accept": DICOM_JSON}) as client:
        for title, make_query in searches.items():
            latencies = []
            for _ in range(args.searches):
                query = make_query()
                started = time.perf_counter()
                response = client.get(f"{base}/workitems?{query}")
                response.read()
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code not in (200, 204):
                    raise RuntimeError(f"{query}: {response.status_code} {response.text}")
            latencies.sort()
            p95 = latencies[int(0.95 * (len(latencies) - 1))]
            rows.append(f"| {title} | {statistics.median(latencies):.1f} | {p95:.1f} |")

    report = "\n".join(
        [
            f"### Worklist at {args.workitems:,} workitems",
            "",
            f"`{' '.join(sys.argv)}` on {platform.node()} ({platform.machine()}, Python {platform.python_version()}); "
            f"{args.clients} concurrent clients for the writes.",
            "",
            "| Writes | Count | Seconds | Per second |",
            "|---|---|---|---|",
            f"| create | {args.workitems} | {create_seconds:.1f} | {args.workitems / create_seconds:.0f} |",
            f"| claim + update + complete (3 requests) | {len(cycled)} | {cycle_seconds:.1f} | "
            f"{len(cycled) / cycle_seconds:.0f} |",
            "",
            f"| Search ({args.searches} requests each) | median ms | p95 ms |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    if args.output:
        with open(args.output, "a") as out:
            out.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
