#!/usr/bin/env python3
"""Index growth and STOW by index backend (issue 13).

``qido``: QIDO-RS medians of bench.py's eight QIDO queries (its own query definitions, request loop and checks) as
the archive grows: store 2,000 instances, measure, grow to 20,000, measure, grow to 200,000, measure.  Every target
(dicomhub on SQLite, on PostgreSQL) gets the same instances, stored into one target after the other, and the queries
alternate between targets.  Instances are tiny (8×8 pixels) but shaped like bench.py's data set: 20 per study in 2
series, 2 studies per patient, study dates 3 days apart, modalities CT/MR/PT/NM 50/30/15/5 %; each stage adds
studies after the earlier ones, so every stage looks like bench.py's data set of that size.

    python benchmarks/growth.py qido --target sqlite=http://127.0.0.1:18180/v2 \\
        --target postgresql=http://127.0.0.1:18181/v2 --sizes 2000,20000,200000 --output growth.md

``stow``: bench.py's STOW phase (its data set, configurations and checks) against several targets, e.g. dicomhub on
PostgreSQL, dicomhub on SQLite and Orthanc, with the ratio of each target to the last one.

    python benchmarks/growth.py stow --target dicomhub-postgresql=http://127.0.0.1:18181/v2 \\
        --target dicomhub-sqlite=http://127.0.0.1:18180/v2 --target orthanc=http://127.0.0.1:18142/dicom-web

Every target must start empty (checked).  benchmarks/run_extra.sh starts the servers and runs both.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import io
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the DICOMweb benchmark: data set shapes, HTTP client, STOW and QIDO phases, tables)

INSTANCES_PER_STUDY = 20
SERIES_PER_STUDY = 2
ROWS = COLS = 8
STUDIES_PER_TASK = 50  # studies encoded per task of the encoding processes


# --------------------------------------------------------------------------------------------
# The growing data set
# --------------------------------------------------------------------------------------------


def make_study(seed: int, s: int) -> bench.Study:
    """Study number s of the growing data set (the same for a seed whatever the size): patient s // 2."""
    p = s // 2
    fam, given = bench.FAMILY_NAMES, bench.GIVEN_NAMES
    study = bench.Study(
        uid=bench._uid(seed, "growth-study", s),
        patient_id=f"PID{p:06d}",
        patient_name=f"{fam[p % len(fam)]}{p:05d}^{given[p % len(given)]}",
        date=bench.STUDY_DATE_ORIGIN + dt.timedelta(days=3 * s),
        accession=f"ACC{s:08d}",
    )
    rng = random.Random(f"{seed}:{s}")
    per_series = INSTANCES_PER_STUDY // SERIES_PER_STUDY
    for se in range(SERIES_PER_STUDY):
        modality = rng.choices(list(bench.MODALITY_WEIGHTS), list(bench.MODALITY_WEIGHTS.values()))[0]
        series = bench.Series(uid=bench._uid(seed, "growth-series", s, se), study=study.uid, modality=modality)
        for i in range(per_series):
            sop = bench._uid(seed, "growth-instance", s, se, i)
            series.instances.append(bench.Instance(study.uid, series.uid, sop, Path()))
        study.series.append(series)
    return study


def data_set(studies: list[bench.Study], seed: int) -> bench.DataSet:
    """A bench.DataSet of the stored studies, for bench.qido_queries (which leaves its multi-frame study out: here a
    study that does not exist)."""
    nowhere = bench.Instance("0", "0", "0", Path())
    return bench.DataSet(Path(), studies, nowhere, ROWS, COLS, 1, seed)


def encode_study(study: bench.Study) -> list[bytes]:
    """The study's instances as Part 10 files: bench.py's attributes, 8×8 pixels."""
    out = []
    pixels = np.arange(ROWS * COLS, dtype=np.uint16).reshape(ROWS, COLS).tobytes()
    for number, series in enumerate(study.series, 1):
        ds = bench._base_dataset(study, series.uid, number, series.modality)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        bench._set_image(ds, ROWS, COLS)
        ds.PixelData = pixels
        for k, inst in enumerate(series.instances):
            ds.SOPInstanceUID = inst.sop
            ds.InstanceNumber = k + 1
            buffer = io.BytesIO()
            bench._write(ds, bench.SOP_CLASS[series.modality], buffer)
            out.append(buffer.getvalue())
    return out


def encode_task(seed: int, first: int, stop: int, batch: int) -> list[tuple[bytes, int]]:
    """STOW bodies (and their instance counts) of studies first..stop-1, ``batch`` instances per body."""
    files = [f for s in range(first, stop) for f in encode_study(make_study(seed, s))]
    return [(multipart(files[k : k + batch]), len(files[k : k + batch])) for k in range(0, len(files), batch)]


def multipart(files: list[bytes]) -> bytes:
    head = f"--{bench.STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + f + b"\r\n" for f in files) + f"--{bench.STOW_BOUNDARY}--\r\n".encode()


def encode_bodies(seed: int, first: int, stop: int, batch: int, processes: int) -> list[tuple[bytes, int]]:
    """Bodies of studies first..stop-1, encoded by ``processes`` processes (pydicom takes ~1 ms per instance)."""
    starts = range(first, stop, STUDIES_PER_TASK)
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        tasks = [pool.submit(encode_task, seed, a, min(a + STUDIES_PER_TASK, stop), batch) for a in starts]
        return [body for t in tasks for body in t.result()]


def store(target: bench.Target, bodies: list[tuple[bytes, int]], clients: int, timeout: float) -> bench.Sample:
    """STOW the bodies with ``clients`` concurrent clients (each its own keep-alive connection), with progress."""
    sample, lock, local = bench.Sample(), threading.Lock(), threading.local()
    made: list[bench.Client] = []
    total = sum(n for _, n in bodies)
    step = max(1, len(bodies) // 10)
    done = [0]
    t0 = time.perf_counter()

    def work(item: tuple[bytes, int]) -> None:
        if not hasattr(local, "client"):
            local.client = bench.make_client(timeout)
            with lock:
                made.append(local.client)
        bench.stow_request(local.client, target.base, item[0], item[1], sample, lock)
        with lock:
            done[0] += 1
            if done[0] % step == 0:
                rate = sample.items / (time.perf_counter() - t0)
                bench.log(f"  {target.name}: {sample.items:,}/{total:,} stored ({rate:,.0f} inst/s)")

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, bodies))
    sample.elapsed = time.perf_counter() - t0
    for c in made:
        c.close()
    return sample


def require_empty(targets: list[bench.Target]) -> None:
    for t in targets:
        try:
            r = t.client.get(f"{t.base}/studies?limit=1", headers={"Accept": bench.DICOM_JSON})
        except bench.HTTPError as exc:
            raise SystemExit(f"target {t.name} ({t.base}) does not answer: {exc}") from exc
        if r.status_code not in (200, 204):
            raise SystemExit(f"target {t.name}: GET /studies?limit=1 gave {bench.describe(r)}")
        if bench.json_count(r):
            raise SystemExit(f"target {t.name} already holds studies; start it with an empty data store")


def run_growth(targets: list[bench.Target], args: argparse.Namespace) -> str:
    sizes = sorted(args.sizes)
    if any(n % INSTANCES_PER_STUDY for n in sizes):
        raise SystemExit(f"sizes must be multiples of {INSTANCES_PER_STUDY}")
    bench.log(f"planning {sizes[-1]:,} instances")
    studies = [make_study(args.seed, s) for s in range(sizes[-1] // INSTANCES_PER_STUDY)]
    medians: dict[tuple[str, str, int], float] = {}
    p95s: dict[tuple[str, str, int], float] = {}
    errors: list[str] = []
    loads: list[list[str]] = []
    labels: list[str] = []
    stored = 0
    for size in sizes:
        first, stop = stored // INSTANCES_PER_STUDY, size // INSTANCES_PER_STUDY
        t0 = time.perf_counter()
        bodies = encode_bodies(args.seed, first, stop, args.batch, args.encoders)
        bench.log(f"encoded {size - stored:,} instances in {time.perf_counter() - t0:.0f} s")
        row = [f"{stored:,} → {size:,}"]
        for t in targets:
            bench.log(f"{t.name}: storing {size - stored:,} instances ({args.clients} clients × {args.batch}/request)")
            sample = store(t, bodies, args.clients, args.timeout)
            cell = f"{sample.elapsed:,.0f} s, {sample.items / sample.elapsed:,.0f} inst/s"
            row.append(cell + (f" **({sample.error_count} err)**" if sample.error_count else ""))
            errors += [f"- **{t.name}**, store to {size:,}: {c} × {m}" for m, c in sample.errors.most_common(3)]
        loads.append(row)
        del bodies
        stored = size
        if args.settle:
            bench.log(f"waiting {args.settle:.0f} s (PostgreSQL's autovacuum analyses new rows once a minute)")
            time.sleep(args.settle)
        queries = bench.qido_queries(data_set(studies[:stop], args.seed), random.Random(args.seed + 1), args.requests)
        rows, cells = bench.run_json_phase(targets, queries, f"QIDO at {size:,}")
        labels = rows
        for label in rows:
            for t in targets:
                s = cells[(label, t.name)]
                medians[(label, t.name, size)] = bench.ms_median(s)
                p95s[(label, t.name, size)] = bench.ms_p95(s)
                errors += [f"- **{t.name}**, {label} at {size:,}: {c} × {m}" for m, c in s.errors.most_common(3)]

    def curve(values: dict[tuple[str, str, int], float]) -> str:
        cols = ["query"]
        for t in targets:
            cols += [f"{t.name} {n:,}" for n in sizes] + [f"{t.name} {sizes[-1]:,}/{sizes[0]:,}"]
        out = []
        for label in labels:
            row = [label]
            for t in targets:
                row += [bench.fmt(values[(label, t.name, n)], 2) for n in sizes]
                ratio = values[(label, t.name, sizes[-1])] / values[(label, t.name, sizes[0])]
                row.append(bench.fmt(ratio, 2) if ratio <= 2 else f"**{bench.fmt(ratio, 2)}**")
            out.append(row)
        return bench.table(cols, out)

    lines = [
        "### QIDO-RS as the archive grows (`benchmarks/growth.py qido`)",
        "",
        f"- {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %z}; targets: "
        + ", ".join(f"**{t.name}** `{t.base}`" for t in targets),
        f"- data: tiny instances ({ROWS}×{COLS} 16-bit, bench.py's attributes), {INSTANCES_PER_STUDY} per study in "
        f"{SERIES_PER_STUDY} series, 2 studies per patient, study dates 3 days apart, modalities CT/MR/PT/NM "
        f"50/30/15/5 %; stored with {args.clients} concurrent clients × {args.batch} instances per request, into one "
        "target after the other; then bench.py's eight QIDO queries (its definitions, checks and request loop, "
        f"requests alternating between targets), {args.requests} requests each, {args.settle:.0f} s after the load "
        f"ends, seed {args.seed}",
        "- a ratio in bold misses the target (the largest size within 2× of the smallest); "
        "`limit=25&offset=N` pages at a random offset up to the number of studies, so it reads more rows as the "
        "archive grows, and `Modality=` with `limit=100` returns up to 100 series (fewer for PT and NM while few "
        "exist)",
        "",
        "Loading (the time to store each step):",
        "",
        bench.table(["instances"] + [t.name for t in targets], loads),
        "",
        "Median latency, ms (lower is better):",
        "",
        curve(medians),
        "",
        "95th percentile, ms:",
        "",
        curve(p95s),
    ]
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines) + "\n"


def run_stow(targets: list[bench.Target], args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="dicomhub-growth-stow-"))
    try:
        n_studies = max(1, args.instances // INSTANCES_PER_STUDY)
        bench.log(f"generating bench.py's data set: {args.instances} instances in {n_studies} studies")
        data = bench.generate_dataset(tmp, args.instances, n_studies, SERIES_PER_STUDY, 256, 256, 50, args.seed)
        rows, cells = bench.run_stow(targets, data, args.stow_clients, args.stow_batches, args.timeout)
        size_mb = data.total_bytes() / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = targets[-1]
    cols = ["configuration", *[t.name for t in targets], *[f"{t.name}/{ref.name}" for t in targets[:-1]]]
    if len(targets) > 2:
        cols.append(f"{targets[0].name}/{targets[1].name}")
    table_rows, errors = [], []
    for label in rows:
        rates = {}
        row = [label]
        for t in targets:
            s = cells.get((label, t.name))
            rates[t.name] = s.items / s.elapsed if s is not None and s.elapsed else float("nan")
            row.append(bench.fmt(rates[t.name]) + (f" **({s.error_count} err)**" if s and s.error_count else ""))
            if s is not None and s.error_count:
                errors.append(
                    f"- **{t.name}**, {label}: " + "; ".join(f"{c} × {m}" for m, c in s.errors.most_common(3))
                )
        pairs = [(t.name, ref.name) for t in targets[:-1]]
        if len(targets) > 2:
            pairs.append((targets[0].name, targets[1].name))
        row += [bench.fmt(rates[a] / rates[b], 2) if rates[b] else "–" for a, b in pairs]
        table_rows.append(row)
    lines = [
        "### STOW-RS by index backend (`benchmarks/growth.py stow`, higher is better)",
        "",
        f"- {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %z}; targets: "
        + ", ".join(f"**{t.name}** `{t.base}`" for t in targets),
        f"- bench.py's STOW phase on its data set: {args.instances:,} single-frame instances (256×256, 16-bit, "
        f"{size_mb:.1f} MB), each configuration its own quarter, one target after the other (the first alternating), "
        f"Python {platform.python_version()} `http.client`",
        "",
        bench.table(cols, table_rows),
    ]
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    qido = sub.add_parser("qido", help="QIDO medians as the archive grows (dicomhub targets)")
    stow = sub.add_parser("stow", help="bench.py's STOW phase against several targets")
    for s in (qido, stow):
        s.add_argument(
            "--target", action="append", type=bench.parse_target, required=True, metavar="NAME=URL", help="repeatable"
        )
        s.add_argument("--seed", type=int, default=1)
        s.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout, s")
        s.add_argument("--output", type=Path, help="append the Markdown section to this file too")
    qido.add_argument("--sizes", type=bench.int_list, default=[2000, 20000, 200000], help="instances at each step")
    qido.add_argument("--clients", type=int, default=4, help="concurrent STOW clients while loading")
    qido.add_argument("--batch", type=int, default=50, help="instances per STOW request while loading")
    qido.add_argument("--requests", type=int, default=100, help="requests per query and step")
    qido.add_argument("--encoders", type=int, default=2, help="processes encoding the instances")
    qido.add_argument(
        "--settle",
        type=float,
        default=60,
        help="seconds between the end of a load and the queries: PostgreSQL's autovacuum (naptime 1 min) analyses "
        "the new rows in that time, as it would in service, and is less likely to run during the timed queries",
    )
    stow.add_argument("--instances", type=int, default=2000)
    stow.add_argument("--stow-clients", type=bench.int_list, default=[1, 4])
    stow.add_argument("--stow-batches", type=bench.int_list, default=[1, 50])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = [bench.Target(n, u, bench.make_client(args.timeout)) for n, u in args.target]
    if len({t.name for t in targets}) != len(targets):
        raise SystemExit("target names must be distinct")
    try:
        require_empty(targets)
        text = run_growth(targets, args) if args.command == "qido" else run_stow(targets, args)
    finally:
        for t in targets:
            t.client.close()
    print(text)
    if args.output:
        with open(args.output, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
