#!/usr/bin/env python3
"""One very large instance (issue 13): STOW-RS and WADO-RS of a ~2 GB uncompressed multi-frame instance against
each target in turn, with the time, the throughput and each server's peak memory while it works.

    python benchmarks/large.py --target dicomhub=http://127.0.0.1:18180/v2 --pid dicomhub=PID \\
        --target orthanc=http://127.0.0.1:18142/dicom-web --pid orthanc=PID --output large.md

The file is written to disk by streaming (a pydicom header, then the Pixel Data element of a defined length appended
frame by frame) and the STOW body is streamed from it, so the client never holds it in memory.  A server's memory
is the VmRSS of its process and of every descendant (uvicorn workers), read from /proc every --interval seconds
while the request runs: VmHWM is kept per process for its whole life and cannot be reset between phases.  The
retrieved part is hashed as it arrives and compared with the file's hash.  A failure (status, refused, connection
dropped, server gone) is reported as it happened, with the tail of the server's log when --log names it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import io
import json
import resource
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pydicom
from pydicom.tag import Tag

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the DICOMweb benchmark: data set attributes, HTTP client, retrieve Accept)

ROWS = COLS = 512
FRAME_BYTES = ROWS * COLS * 2  # 16-bit
CHUNK = 1 << 20
BOUNDARY = "dicomhub-large-4d1c0b7e9a25"
HOLD_BACK = 4096  # bytes of a streamed part kept unhashed until the next chunk shows they are not its trailer
MB = 1e6


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


@dataclass
class LargeFile:
    path: Path
    size: int
    frames: int
    study: str
    series: str
    sop: str
    sha256: str  # of the whole file
    pixel_sha256: str  # of the Pixel Data value alone
    seconds: float  # to write it


def write_large_instance(path: Path, approx_bytes: int, seed: int) -> LargeFile:
    """Write a Multi-frame Grayscale Word SC instance of about ``approx_bytes``: the header through pydicom, then a
    Pixel Data element of a defined length, its 512×512 frames appended one at a time (never all in memory)."""
    frames = max(1, approx_bytes // FRAME_BYTES)
    pixel_length = frames * FRAME_BYTES
    if pixel_length > 0xFFFFFFFE:
        raise ValueError("Pixel Data of a defined length holds at most 4 GiB - 2 bytes")
    started = time.perf_counter()
    study = bench.Study(
        uid=bench._uid(seed, "large-study"),
        patient_id="PIDLARGE0001",
        patient_name="Large^Lara",
        date=bench.STUDY_DATE_ORIGIN,
        accession="ACCLARGE0001",
    )
    series = bench._uid(seed, "large-series")
    ds = bench._base_dataset(study, series, 1, "OT")
    ds.SOPInstanceUID = bench._uid(seed, "large-instance")
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = Tag("FrameTime")
    ds.FrameTime = 40.0
    bench._set_image(ds, ROWS, COLS)
    header = io.BytesIO()
    bench._write(ds, bench.MULTIFRAME_SOP_CLASS, header)  # every element but Pixel Data, which sorts last
    whole, pixels = hashlib.sha256(), hashlib.sha256()
    phantom = bench._phantom(ROWS, COLS)
    with open(path, "wb") as fh:
        for piece in (header.getvalue(), struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_length)):
            fh.write(piece)
            whole.update(piece)
        for k in range(frames):  # each frame differs, so a frame served twice or out of order is noticed
            frame = (np.roll(phantom, k % ROWS, axis=0) + np.uint16(k % 977)).tobytes()
            fh.write(frame)
            whole.update(frame)
            pixels.update(frame)
    check = pydicom.dcmread(path, stop_before_pixels=True)
    if int(check.NumberOfFrames) != frames:
        raise RuntimeError(f"{path}: the written header does not read back")
    return LargeFile(
        path,
        path.stat().st_size,
        frames,
        study.uid,
        series,
        ds.SOPInstanceUID,
        whole.hexdigest(),
        pixels.hexdigest(),
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (children of any of its threads), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM (kB) of one process; empty when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class Memory:
    """What a sampler saw: peaks in MB over the samples, the baseline before the phase, VmHWM after it."""

    before: float = 0.0  # VmRSS of all the processes at the start
    peak_total: float = 0.0  # largest sum of VmRSS over the processes at one sample
    peak_anon: float = 0.0  # largest sum of RssAnon (VmRSS less file-backed and shared pages)
    peak_one: float = 0.0  # largest VmRSS of a single process
    hwm_one: float = 0.0  # largest lifetime VmHWM of a single process when the phase ended (an upper bound)
    samples: int = 0
    processes: int = 0


class RssSampler:
    """Samples the memory of a server's process tree in a thread while a phase runs (a context manager)."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.memory = Memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[float, float, float, int]:
        values = [memory_kb(p) for p in process_tree(self.pid)]
        values = [v for v in values if v]
        total = sum(v.get("VmRSS", 0) for v in values) / 1024
        anon = sum(v.get("RssAnon", 0) for v in values) / 1024
        one = max((v.get("VmRSS", 0) for v in values), default=0) / 1024
        return total, anon, one, len(values)

    def _record(self) -> None:
        total, anon, one, count = self._sample()
        m = self.memory
        m.peak_total, m.peak_anon, m.peak_one = max(m.peak_total, total), max(m.peak_anon, anon), max(m.peak_one, one)
        m.processes = max(m.processes, count)
        m.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def __enter__(self) -> RssSampler:
        self.memory.before = self._sample()[0]
        self._record()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
        hwm = [memory_kb(p).get("VmHWM", 0) for p in process_tree(self.pid)]
        self.memory.hwm_one = max(hwm, default=0) / 1024


# --------------------------------------------------------------------------------------------
# STOW and WADO
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    server: str
    operation: str
    ok: bool = False
    detail: str = ""
    seconds: float = float("nan")
    bytes: int = 0
    memory: Memory = field(default_factory=Memory)
    alive_after: bool = True


def stow_body(lf: LargeFile) -> tuple[int, Iterator[bytes]]:
    """Content-Length and the chunks of a one-part multipart/related body read from the file as it is sent."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with open(lf.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield tail

    return len(head) + lf.size + len(tail), chunks()


def stow(base: str, lf: LargeFile, timeout: float) -> tuple[bool, str, int]:
    """POST the file; (stored, what happened, bytes sent).  An answer that comes while the body is still being sent
    (a 413, say) is read after the send fails."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    length, body = stow_body(lf)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Accept": bench.DICOM_JSON,
        "Content-Length": str(length),
    }
    send_error = ""
    try:
        try:
            conn.request("POST", f"{parts.path}/studies", body=body, headers=headers)
        except (OSError, http.client.HTTPException) as exc:
            send_error = f"sending the body failed: {type(exc).__name__}: {exc}"
        try:
            response = conn.getresponse()
            text = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return False, send_error or f"no answer: {type(exc).__name__}: {exc}", length
    finally:
        conn.close()
    prefix = f"{send_error}; then " if send_error else ""
    if response.status != 200:
        message = text[:300].decode("utf-8", "replace").replace("\n", " ")
        return False, f"{prefix}HTTP {response.status} {message}".strip(), length
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        return False, f"{prefix}HTTP 200 but the answer is not JSON", length
    failed = doc.get("00081198", {}).get("Value", [])
    stored = doc.get("00081199", {}).get("Value", [])
    if failed or len(stored) != 1:
        detail = f"{prefix}HTTP 200, {len(stored)} stored, {len(failed)} failed: {json.dumps(failed)[:300]}"
        return False, detail, length
    return True, "stored" if not send_error else f"stored ({send_error})", length


def scan_part(chunks: Iterator[bytes], boundary: bytes, pixel_data: bool) -> tuple[int, int, str, str]:
    """Stream a single-part multipart/related body: (boundaries seen, payload bytes, SHA-256 of the payload, SHA-256 of
    its top-level Pixel Data value or '' unless asked).  Nothing but the current chunk is kept."""
    delim = b"--" + boundary
    whole, pixels = hashlib.sha256(), hashlib.sha256()
    pixel_start = -1  # offset of the Pixel Data value in the payload, once found
    delims = 0
    tail = b""  # the last len(delim) - 1 bytes seen, to count boundaries across chunks
    head = b""  # bytes before the payload (preamble, boundary, part headers)
    hold = b""  # payload bytes not hashed yet
    offset = 0  # payload bytes hashed so far
    started = False
    for chunk in chunks:
        seen = tail + chunk
        delims += seen.count(delim) - tail.count(delim)
        tail = seen[-(len(delim) - 1) :]
        if not started:
            head += chunk
            start = head.find(delim)
            end = head.find(b"\r\n\r\n", start) if start >= 0 else -1
            if end < 0:
                continue
            started, hold, head = True, head[end + 4 :], b""
        else:
            hold += chunk
        if len(hold) <= HOLD_BACK:
            continue
        ready, hold = hold[:-HOLD_BACK], hold[-HOLD_BACK:]
        if pixel_data and pixel_start < 0 and offset == 0:
            found = ready.find(b"\xe0\x7f\x10\x00O")  # (7FE0,0010) OB/OW in explicit VR little endian
            pixel_start = found + 12 if found >= 0 else -1
        whole.update(ready)
        if pixel_start >= 0:
            pixels.update(ready[max(0, pixel_start - offset) :])
        offset += len(ready)
    end = hold.rfind(b"\r\n" + delim)
    if end >= 0:
        hold = hold[:end]
    whole.update(hold)
    if pixel_start >= 0:
        pixels.update(hold[max(0, pixel_start - offset) :])
    return delims, offset + len(hold), whole.hexdigest(), pixels.hexdigest() if pixel_start >= 0 else ""


def retrieve(base: str, lf: LargeFile, timeout: float, pixel_data: bool = False) -> tuple[bool, str, int]:
    """GET the instance as stored (``transfer-syntax=*``) and compare what comes with the file; (same, what, bytes)."""
    path = f"{base}/studies/{lf.study}/series/{lf.series}/instances/{lf.sop}"
    client = bench.make_client(timeout)
    try:
        with client.stream("GET", path, headers={"Accept": bench.ACCEPT_STUDY}) as r:
            if r.status_code != 200:
                text = r.read()[:300].decode("utf-8", "replace").replace("\n", " ")
                return False, f"HTTP {r.status_code} {text}".strip(), 0
            _, params = bench.content_type_params(r.headers.get("content-type", ""))
            boundary = params.get("boundary", "").encode()
            if not boundary:
                return False, f"no boundary in Content-Type {r.headers.get('content-type')!r}", 0
            delims, size, digest, pixel_digest = scan_part(r.iter_raw(CHUNK), boundary, pixel_data)
    except bench.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}", 0
    finally:
        client.close()
    if delims != 2:
        return False, f"{max(0, delims - 1)} parts, expected 1", size
    if digest == lf.sha256:
        return True, "identical to the file (SHA-256)", size
    if pixel_data:
        same = "the same" if pixel_digest == lf.pixel_sha256 else "different"
        return False, f"part of {size:,} bytes differs from the file ({lf.size:,} bytes); Pixel Data {same}", size
    return False, f"part of {size:,} bytes differs from the file ({lf.size:,} bytes)", size


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def log_tail(path: Path | None, lines: int = 8) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_target(name: str, base: str, pid: int, log_path: Path | None, lf: LargeFile, args: argparse.Namespace):
    """STOW then WADO of the file against one server, each watched by a sampler; a retrieve follows only a store."""

    def watched(operation: str, action: Callable[[], tuple[bool, str, int]]) -> Outcome:
        out = Outcome(name, operation)
        with RssSampler(pid, args.interval) as sampler:
            t0 = time.perf_counter()
            out.ok, out.detail, out.bytes = action()
            out.seconds = time.perf_counter() - t0
        out.memory, out.alive_after = sampler.memory, alive(pid)
        return out

    bench.log(f"{name}: STOW of {lf.size / MB:,.0f} MB")
    out = watched("STOW", lambda: stow(base, lf, args.timeout))
    outcomes = [out]
    bench.log(f"{name}: STOW {out.detail} in {out.seconds:.1f} s, peak RSS {out.memory.peak_total:,.0f} MB")
    if not out.ok:
        return outcomes
    bench.log(f"{name}: WADO of the instance")
    out = watched("WADO (transfer-syntax=*)", lambda: retrieve(base, lf, args.timeout))
    if not out.ok and out.bytes and out.alive_after:  # bytes came but differ: where? (untimed)
        out.detail = retrieve(base, lf, args.timeout, pixel_data=True)[1]
    outcomes.append(out)
    bench.log(f"{name}: WADO {out.detail} in {out.seconds:.1f} s, peak RSS {out.memory.peak_total:,.0f} MB")
    return outcomes


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def report(lf: LargeFile, outcomes: list[Outcome], logs: dict[str, Path], args: argparse.Namespace) -> str:
    rows = []
    for o in outcomes:
        m = o.memory
        result = ("ok" if o.ok else "**failed**") + f": {o.detail}"
        if not o.alive_after:
            result += " **(the server process was gone afterwards)**"
        rate = o.bytes / MB / o.seconds if o.ok and o.seconds else float("nan")
        rows.append(
            [
                o.server,
                o.operation,
                result,
                bench.fmt(o.seconds, 1),
                bench.fmt(rate, 1),
                f"{m.before:,.0f} → {m.peak_total:,.0f}",
                f"{m.peak_total - m.before:,.0f}",
                f"{m.peak_anon:,.0f}",
                f"{m.peak_one:,.0f}",
                f"{m.hwm_one:,.0f}",
            ]
        )
    cols = [
        "server",
        "operation",
        "result",
        "seconds",
        "MB/s",
        "RSS before → peak, MB (all processes)",
        "growth, MB",
        "peak anonymous RSS, MB (all)",
        "peak RSS of one process, MB",
        "VmHWM of one process after, MB",
    ]
    lines = [
        f"### One {lf.size / 1e9:.1f} GB instance: STOW-RS and WADO-RS with peak server memory",
        "",
        f"- {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %z}; `benchmarks/large.py` "
        + " ".join(f"`--target {n}={u}`" for n, u in args.target),
        f"- file: one Multi-frame Grayscale Word SC instance, {lf.frames:,} frames of {ROWS}×{COLS} 16-bit "
        f"MONOCHROME2, explicit VR little endian, uncompressed, Pixel Data of a defined length: {lf.size:,} bytes "
        f"({lf.size / 2**30:.2f} GiB), written by streaming in {lf.seconds:.1f} s; STOW body streamed from the file "
        f"(1 MiB reads, `Content-Length` given); client peak RSS {client_peak_mb():,.0f} MB",
        '- WADO: `GET …/instances/{sop}` with `Accept: multipart/related; type="application/dicom"; '
        "transfer-syntax=*`, read in 1 MiB chunks and hashed (SHA-256) as they come (the hashing is in the time); "
        "MB/s = bytes received / s (10^6 bytes)",
        f"- memory: VmRSS of the server process and every descendant (uvicorn workers) from /proc/PID/status, sampled "
        f"every {args.interval * 1000:.0f} ms while the request ran; *all processes* is the largest sum at one "
        "sample, *anonymous* the same for RssAnon (heap, without mapped files), *one process* the largest single "
        "process; VmHWM is each process's lifetime peak (not resettable), read when the phase ended, an upper bound "
        "that also catches spikes between samples",
        "",
        bench.table(cols, rows),
    ]
    tails = [(o.server, logs.get(o.server)) for o in outcomes if not o.ok]
    for server, path in dict(tails).items():
        text = log_tail(path)
        if text:
            lines += ["", f"Last lines of {server}'s log (`{path}`):", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def client_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def named(kind: type, value: str) -> tuple[str, object]:
    name, sep, rest = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    try:
        return name, kind(rest)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--target", action="append", type=bench.parse_target, required=True, metavar="NAME=URL", help="DICOMweb base"
    )
    p.add_argument(
        "--pid",
        action="append",
        type=lambda v: named(int, v),
        default=[],
        metavar="NAME=PID",
        help="server process of target NAME (its descendants are counted too); required for every target",
    )
    p.add_argument(
        "--log", action="append", type=lambda v: named(Path, v), default=[], metavar="NAME=PATH", help="server log"
    )
    p.add_argument("--size-mb", type=float, default=2000, help="approximate file size, 10^6 bytes (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the UIDs (default 1)")
    p.add_argument("--interval", type=float, default=0.05, help="memory sampling period, s (default 0.05)")
    p.add_argument("--timeout", type=float, default=3600, help="HTTP timeout, s (default 3600)")
    p.add_argument("--data-dir", type=Path, help="folder for the file (default: a temporary folder, removed)")
    p.add_argument("--output", type=Path, help="append the Markdown section to this file too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pids, logs = dict(args.pid), dict(args.log)
    missing = [n for n, _ in args.target if n not in pids]
    if missing:
        print(f"--pid is missing for {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dicomhub-large-", dir=args.data_dir) as folder:
        bench.log(f"writing a {args.size_mb:,.0f} MB instance under {folder}")
        lf = write_large_instance(Path(folder) / "large.dcm", int(args.size_mb * MB), args.seed)
        bench.log(f"{lf.size:,} bytes, {lf.frames} frames, written in {lf.seconds:.1f} s")
        outcomes = []
        for name, base in args.target:
            outcomes += run_target(name, base, pids[name], logs.get(name), lf, args)
        text = report(lf, outcomes, logs, args)
    print(text)
    if args.output:
        with open(args.output, "a") as fh:
            fh.write(text + "\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
