"""DIMSE phase: C-STORE throughput with DCMTK's storescu and C-FIND latency, dicomhub against Orthanc in one run.

It starts both servers itself on loopback with fresh, empty storage (``dicomhub dimse`` with default storage
settings: SQLite, fsync; a private Orthanc 1.10 with its defaults, DICOM on, the benchmark's AE title registered),
writes two sets of CT images (512 x 512, 16-bit, explicit VR little endian), then:

1. single association: one ``storescu`` sends the first set, to each server in turn;
2. 4 parallel associations: four ``storescu`` processes send a quarter of the second set each, at once;
3. with ``--find-instances N``: small images (64 x 64) are added until each server holds N, sent by four
   ``storescu`` processes at once to each server in turn;
4. C-FIND: a pynetdicom SCU on one association per server asks, alternately, the same study-level (by Patient ID,
   by a Patient Name wildcard), series-level and image-level queries; every answer's match count is checked.

The first server alternates between phases. Throughput is images/s over the wall time of the storescu processes
(their start-up included, the same for both); every image must be acknowledged with 0000.

    .venv/bin/python benchmarks/dimse.py --images 1000 --output /tmp/dimse.md
    .venv/bin/python benchmarks/dimse.py --images 1000 --find-instances 20000 --output /tmp/dimse.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port  # noqa: E402
from tests.support.orthanc import ORTHANC, Orthanc  # noqa: E402
from tests.support.processes import start_process, stop_process  # noqa: E402

CALLING_AET = "BENCH"
IMAGES_PER_SERIES = 100
# DCMTK (storescu, and Orthanc's DICOM side) leaves Nagle's algorithm on unless told: every small response PDU
# then waits for a delayed ACK. dicomhub turns it off on its listener; the client sockets below do too.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Target:
    name: str
    ae_title: str
    port: int
    process: subprocess.Popen

    def stop(self) -> None:
        stop_process(self.process)


def start_dicomhub(home: Path) -> Target:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    env.update(DICOMHUB_DATA_DIR=str(home / "data"), DICOMHUB_DIMSE_PORT=str(port), DICOMHUB_LOG_LEVEL="warning")
    command = [sys.executable, "-m", "dicomhub", "dimse"]
    process = start_process(command, home / "dicomhub.log", "dicomhub dimse", lambda: listening(port), env=env)
    return Target("dicomhub", "DICOMHUB", port, process)


def start_orthanc(home: Path) -> Target:
    port = free_port()
    orthanc = Orthanc(
        home / "orthanc",
        "bench-dimse",
        DicomServerEnabled=True,
        DicomAet="ORTHANC",
        DicomPort=port,
        DicomCheckModalityHost=True,
        DicomCheckCalledAet=False,
        DicomModalities={"bench": [CALLING_AET, "127.0.0.1", 1]},
        SaveJobs=False,
    ).start(ready=lambda: listening(port), env=DCMTK_ENV)
    return Target("orthanc", "ORTHANC", port, orthanc.process)


def orthanc_version() -> str:
    """``Orthanc --version`` prints ``/usr/sbin/Orthanc 1.10.1`` first."""
    first = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return first.split()[-1]


def write_images(folder: Path, count: int, label: str, side: int = 512) -> list[Path]:
    """CT images of ``IMAGES_PER_SERIES`` per study (one series each); the pixels are shared, the UIDs are not."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(14)
    pixels = rng.integers(0, 4096, size=(side, side), dtype=np.uint16).tobytes()
    paths = []
    for n in range(count):
        if n % IMAGES_PER_SERIES == 0:
            study, series, patient = generate_uid(), generate_uid(), f"{label}{n // IMAGES_PER_SERIES:04d}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = patient, f"Bench^{patient}"
        ds.StudyDate, ds.Modality, ds.InstanceNumber = "20240101", "CT", n % IMAGES_PER_SERIES + 1
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(target: Target, groups: list[list[Path]]) -> float:
    """Runs one storescu per group at once; wall seconds. Fails unless every image was acknowledged 0000."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-aet", CALLING_AET, "-aec", target.ae_title, "127.0.0.1", str(target.port), *map(str, g)],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for g in groups
    ]
    outputs = [p.communicate(timeout=3600)[0] for p in processes]
    elapsed = time.perf_counter() - started
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0 or "Store Failed" in output or "Status" in output:
            raise RuntimeError(f"storescu to {target.name} failed: {output[-2000:]}")
    return elapsed


def find_latencies(targets: list[Target], queries: list[tuple[str, Dataset, int]], repeats: int) -> dict:
    """{(query, target): [ms]}: the queries alternate between targets, one association each."""
    associations = {}
    for target in targets:
        ae = AE(ae_title=CALLING_AET)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", target.port, ae_title=target.ae_title)
        if not assoc.is_established:
            raise RuntimeError(f"C-FIND association to {target.name} failed")
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        associations[target.name] = assoc
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(repeats):
            for name, identifier, expected in queries:
                for target in targets:
                    started = time.perf_counter()
                    answers = list(
                        associations[target.name].send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                    )
                    elapsed = (time.perf_counter() - started) * 1000
                    matches = sum(1 for status, _ in answers if status.Status in (0xFF00, 0xFF01))
                    if answers[-1][0].Status != 0 or matches != expected:
                        raise RuntimeError(f"{target.name} {name}: {matches} matches, expected {expected}")
                    times.setdefault((name, target.name), []).append(elapsed)
    finally:
        for assoc in associations.values():
            assoc.release()
    return times


def queries_for(images: list[Path]) -> list[tuple[str, Dataset, int]]:
    import pydicom

    first = pydicom.dcmread(images[0], stop_before_pixels=True)
    studies = -(-len(images) // IMAGES_PER_SERIES)

    def query(level: str, **keys) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for key, value in keys.items():
            setattr(ds, key, value)
        return ds

    return [
        (
            "study by PatientID",
            query(
                "STUDY",
                PatientID=first.PatientID,
                StudyInstanceUID="",
                PatientName="",
                StudyDate="",
                NumberOfStudyRelatedInstances="",
            ),
            1,
        ),
        ("studies by PatientName wildcard", query("STUDY", PatientName="bench^s*", StudyInstanceUID=""), studies),
        (
            "series of a study",
            query("SERIES", StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID="", Modality=""),
            1,
        ),
        (
            f"images of a series ({IMAGES_PER_SERIES})",
            query(
                "IMAGE",
                StudyInstanceUID=first.StudyInstanceUID,
                SeriesInstanceUID=first.SeriesInstanceUID,
                SOPInstanceUID="",
                InstanceNumber="",
            ),
            IMAGES_PER_SERIES,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images per C-STORE configuration")
    parser.add_argument("--find-repeats", type=int, default=30, help="times each C-FIND query is asked")
    parser.add_argument(
        "--find-instances", type=int, default=0, help="instances each server holds for C-FIND (small ones added)"
    )
    parser.add_argument("--output", type=Path, required=True, help="markdown report")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dicomhub-dimse-bench-"))
    targets: list[Target] = []
    try:
        print("writing images", file=sys.stderr)
        single_set = write_images(home / "single", args.images, "S")
        parallel_set = write_images(home / "parallel", args.images, "P")
        size = sum(p.stat().st_size for p in single_set) / args.images / 1e6
        targets = [start_dicomhub(home), start_orthanc(home)]
        rows = []
        for phase, (images, groups) in enumerate(
            (("1 association", [single_set]), ("4 parallel associations", [parallel_set[i::4] for i in range(4)]))
        ):
            rates = {}
            for target in targets if phase % 2 == 0 else targets[::-1]:
                seconds = storescu(target, groups)
                rates[target.name] = args.images / seconds
                print(f"C-STORE {images} {target.name}: {rates[target.name]:.1f} images/s", file=sys.stderr)
            rows.append((images, rates["dicomhub"], rates["orthanc"]))
        stored = 2 * args.images
        if args.find_instances > stored:
            extra = write_images(home / "find", args.find_instances - stored, "F", side=64)
            for target in targets:
                seconds = storescu(target, [extra[i::4] for i in range(4)])
                print(f"C-STORE {len(extra)} small images {target.name}: {seconds:.0f} s", file=sys.stderr)
            stored = args.find_instances
        times = find_latencies(targets, queries_for(single_set), args.find_repeats)
        lines = [
            "## DIMSE (`benchmarks/dimse.py`)",
            "",
            f"`dicomhub dimse` (SQLite, fsync) against Orthanc {orthanc_version()}"
            f" (defaults), each with an empty store; {args.images} CT images of {size:.2f} MB per configuration, "
            "DCMTK storescu (`storescu -aet BENCH -aec AET host port FILES…`, explicit VR little endian); "
            f"C-FIND by pynetdicom on one association, {args.find_repeats} times each, over "
            f"{stored} stored images.",
            "",
            "| C-STORE | dicomhub images/s | Orthanc images/s | ratio |",
            "|---|---|---|---|",
        ]
        lines += [f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |" for name, ours, theirs in rows]
        lines += [
            "",
            "| C-FIND | dicomhub median / p95 ms | Orthanc median / p95 ms | ratio of medians (>1: dicomhub slower) |",
            "|---|---|---|---|",
        ]
        for name, _, _ in queries_for(single_set):
            ours, theirs = times[(name, "dicomhub")], times[(name, "orthanc")]
            p95 = lambda v: statistics.quantiles(v, n=20)[-1]  # noqa: E731
            lines.append(
                f"| {name} | {statistics.median(ours):.1f} / {p95(ours):.1f} | "
                f"{statistics.median(theirs):.1f} / {p95(theirs):.1f} | "
                f"{statistics.median(ours) / statistics.median(theirs):.2f} |"
            )
        args.output.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        for target in targets:
            target.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
