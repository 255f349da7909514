#!/usr/bin/env python3
"""DICOMweb benchmark: STOW-RS, QIDO-RS, metadata, WADO-RS and frame retrieval.

Runs the same generated data set against one or more DICOMweb services in one run, alternating
between the targets request by request (or configuration by configuration for STOW), so that
machine noise hits every target alike.  Each target must start with an empty data store.

Example:
    python benchmarks/bench.py --target dicomhub=http://127.0.0.1:18080/v2 \\
        --target orthanc=http://127.0.0.1:18042/dicom-web --output results.md

The first table column after the label is the first target; with two or more targets a ratio
column (first target / second target) follows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import http.client
import io
import json
import platform
import random
import select
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

DICOM_JSON = "application/dicom+json"
ACCEPT_STUDY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
ACCEPT_FRAME_UNCOMPRESSED = (
    f'multipart/related; type="application/octet-stream"; transfer-syntax={ExplicitVRLittleEndian}'
)
ACCEPT_INSTANCE_EXPLICIT = f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'
STOW_BOUNDARY = "dicomhub-bench-7f3a9c1e5b2d4f60"

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",  # PET Image Storage
    "NM": "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
}
MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
MODALITY_WEIGHTS = {"CT": 0.5, "MR": 0.3, "PT": 0.15, "NM": 0.05}
FAMILY_NAMES = [
    "Adler",
    "Baker",
    "Castro",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ito",
    "Jensen",
    "Kowalski",
    "Larsen",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quinn",
    "Rossi",
    "Silva",
    "Tanaka",
]
GIVEN_NAMES = ["Ada", "Ben", "Chloe", "David", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira"]
STUDY_DATE_ORIGIN = dt.date(2015, 1, 1)


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


@dataclass
class Instance:
    study: str
    series: str
    sop: str
    path: Path
    frames: int = 1


@dataclass
class Series:
    uid: str
    study: str
    modality: str
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Study:
    uid: str
    patient_id: str
    patient_name: str
    date: dt.date
    accession: str
    series: list[Series] = field(default_factory=list)

    @property
    def instances(self) -> list[Instance]:
        return [i for s in self.series for i in s.instances]


@dataclass
class DataSet:
    root: Path
    studies: list[Study]  # every study, including the multi-frame one
    multiframe: Instance
    rows: int
    cols: int
    frames: int
    seed: int

    @property
    def ordinary(self) -> list[Instance]:
        """Single-frame instances, in study/series order."""
        return [i for st in self.studies for i in st.instances if i is not self.multiframe]

    @property
    def all_series(self) -> list[Series]:
        return [se for st in self.studies for se in st.series]

    def total_bytes(self) -> int:
        return sum(i.path.stat().st_size for st in self.studies for i in st.instances)


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[f"dicomhub-bench:{seed}", *map(str, parts)])


def _phantom(rows: int, cols: int) -> np.ndarray:
    """A CT-like slice in stored values (HU + 1024): air, a body ellipse and two 'organs'."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    img = np.zeros((rows, cols), np.float32)  # air: -1024 HU
    body = ((x - cx) / (0.42 * cols)) ** 2 + ((y - cy) / (0.34 * rows)) ** 2 <= 1
    img[body] = 1024 + 40  # soft tissue
    organ = ((x - 0.38 * cols) / (0.08 * cols)) ** 2 + ((y - cy) / (0.12 * rows)) ** 2 <= 1
    img[organ] = 1024 + 60
    bone = ((x - cx) / (0.05 * cols)) ** 2 + ((y - 0.62 * rows) / (0.05 * rows)) ** 2 <= 1
    img[bone] = 1024 + 700
    return img.astype(np.uint16)


def _base_dataset(study: Study, series_uid: str, series_number: int, modality: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.AccessionNumber = study.accession
    ds.StudyID = study.accession[-6:]
    ds.StudyDescription = "dicomhub benchmark study"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = ds.StudyDate
    ds.Modality = modality
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.Manufacturer = "dicomhub-bench"
    return ds


def _set_image(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelSpacing = [0.7, 0.7]


def _write(ds: Dataset, sop_class: str, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def generate_dataset(
    root: Path, n_instances: int, n_studies: int, series_per_study: int, rows: int, cols: int, frames: int, seed: int
) -> DataSet:
    """Write the data set as DICOM Part 10 files under root (explicit VR little endian)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    n_studies = max(1, min(n_studies, n_instances))
    series_per_study = max(1, series_per_study)
    n_patients = max(1, n_studies // 2)
    phantom = _phantom(rows, cols)
    per_study = _split(n_instances, n_studies)
    modalities = list(MODALITY_WEIGHTS)
    weights = list(MODALITY_WEIGHTS.values())
    studies: list[Study] = []
    counter = 0
    for s_idx in range(n_studies):
        p = s_idx % n_patients
        study = Study(
            uid=_uid(seed, "study", s_idx),
            patient_id=f"PID{p:06d}",
            patient_name=f"{FAMILY_NAMES[p % len(FAMILY_NAMES)]}{p:05d}^{GIVEN_NAMES[p % len(GIVEN_NAMES)]}",
            date=STUDY_DATE_ORIGIN + dt.timedelta(days=3 * s_idx),
            accession=f"ACC{s_idx:08d}",
        )
        n_series = min(series_per_study, per_study[s_idx]) or 1
        for se_idx, n_inst in enumerate(_split(per_study[s_idx], n_series)):
            modality = rng.choices(modalities, weights)[0]
            series = Series(uid=_uid(seed, "series", s_idx, se_idx), study=study.uid, modality=modality)
            study_dir = root / f"s{s_idx:05d}"
            study_dir.mkdir(exist_ok=True)
            for i_idx in range(n_inst):
                ds = _base_dataset(study, series.uid, se_idx + 1, modality)
                ds.SOPInstanceUID = _uid(seed, "instance", s_idx, se_idx, i_idx)
                ds.InstanceNumber = i_idx + 1
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
                ds.FrameOfReferenceUID = _uid(seed, "for", s_idx)
                ds.ImagePositionPatient = [-90.0, -90.0, -2.5 * i_idx]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.SliceThickness = 2.5
                ds.SliceLocation = -2.5 * i_idx
                _set_image(ds, rows, cols)
                pixels = np.roll(phantom, (counter * 3) % cols, axis=1) + np.uint16(counter % 97)
                ds.PixelData = pixels.tobytes()
                path = study_dir / f"{se_idx:02d}_{i_idx:05d}.dcm"
                _write(ds, SOP_CLASS[modality], path)
                series.instances.append(Instance(study.uid, series.uid, ds.SOPInstanceUID, path))
                counter += 1
            study.series.append(series)
        studies.append(study)

    # The multi-frame instance: its own patient and study, one series.
    mf_study = Study(
        uid=_uid(seed, "mf-study"),
        patient_id="PIDMF00001",
        patient_name="Multiframe^Frank",
        date=STUDY_DATE_ORIGIN - dt.timedelta(days=1),
        accession="ACCMF0000001",
    )
    mf_series = Series(uid=_uid(seed, "mf-series"), study=mf_study.uid, modality="OT")
    ds = _base_dataset(mf_study, mf_series.uid, 1, "OT")
    ds.SOPInstanceUID = _uid(seed, "mf-instance")
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    ds.FrameTime = 40.0
    _set_image(ds, rows, cols)
    stack = np.stack([np.roll(phantom, 5 * k, axis=0) + np.uint16(k) for k in range(frames)])
    ds.PixelData = stack.tobytes()
    mf_path = root / "multiframe.dcm"
    _write(ds, MULTIFRAME_SOP_CLASS, mf_path)
    multiframe = Instance(mf_study.uid, mf_series.uid, ds.SOPInstanceUID, mf_path, frames=frames)
    mf_series.instances.append(multiframe)
    mf_study.series.append(mf_series)
    studies.append(mf_study)
    return DataSet(root, studies, multiframe, rows, cols, frames, seed)


def expected_frame(ds_set: DataSet, inst: Instance, number: int) -> bytes:
    """Native pixel bytes of one frame (1-based) as stored in the file."""
    pixel_data = pydicom.dcmread(inst.path).PixelData
    size = ds_set.rows * ds_set.cols * 2
    return pixel_data[(number - 1) * size : number * size]


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------
#
# A small keep-alive client on http.client: a general-purpose client (httpx was measured at about
# 2 ms per request on the reference machine, more than some of the servers' own answers) would
# dominate the latencies and pull every ratio towards 1.  One Client holds one persistent
# connection per origin and is not thread-safe: each thread uses its own Client.


class HTTPError(Exception):
    """A request failed below HTTP: connection, timeout or protocol error."""


CONNECTION_ERRORS = (OSError, http.client.HTTPException)  # socket.timeout is an OSError
# The server closed an idle keep-alive connection: the request may be sent again on a new one.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
# Accept-Encoding as httpx sent it: dicomhub gzips JSON answers above 1 KiB when asked (the
# client decodes them, within the measured time); Orthanc's HTTP compression is off in run.sh.
DEFAULT_HEADERS = {
    "User-Agent": f"dicomhub-bench (Python {platform.python_version()} http.client)",
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate",
}


def decode_body(data: bytes, encoding: str) -> bytes:
    """Undo a gzip or deflate Content-Encoding."""
    encoding = encoding.strip().lower()
    if not data or encoding in ("", "identity"):
        return data
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(data, zlib.MAX_WBITS | 16)
    if encoding == "deflate":
        try:
            return zlib.decompress(data)
        except zlib.error:
            return zlib.decompress(data, -zlib.MAX_WBITS)
    raise HTTPError(f"unsupported Content-Encoding {encoding!r}")


class Response:
    """status_code, headers (case-insensitive get), content (decoded), text and json()."""

    def __init__(self, status_code: int, headers: Message, content: bytes = b""):
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        _, params = content_type_params(self.headers.get("content-type", ""))
        try:
            return self.content.decode(params.get("charset", "utf-8"), errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.content)


class StreamResponse(Response):
    """A response whose body is read by the caller, in chunks (iter_raw) or whole (read)."""

    def __init__(self, raw: http.client.HTTPResponse):
        super().__init__(raw.status, raw.headers)
        self._raw = raw

    def iter_raw(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The body as sent (Transfer-Encoding undone, Content-Encoding not)."""
        while chunk := self._raw.read(chunk_size):
            yield chunk
        self.check_complete()

    def check_complete(self) -> None:
        # read(amt) ends quietly when the connection closes before Content-Length bytes came.
        if self._raw.length:
            raise http.client.IncompleteRead(b"", self._raw.length)

    def read(self) -> bytes:
        self.content = decode_body(self._raw.read(), self.headers.get("content-encoding", ""))
        return self.content


class Client:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}

    def _connection(self, origin: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        """The connection for origin and whether it was used before (a new one is not yet open)."""
        conn = self._conns.get(origin)
        if conn is not None and conn.sock is not None:
            # An idle keep-alive socket that is readable was closed by the server (or holds
            # unexpected bytes): drop it instead of failing the next request on it.
            if select.select([conn.sock], [], [], 0)[0]:
                conn.close()
            else:
                return conn, True
        if conn is None:
            scheme, host, port = origin
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = cls(host, port, timeout=self.timeout)
            self._conns[origin] = conn
        return conn, False

    @staticmethod
    def _split(url: str) -> tuple[tuple[str, str, int], str]:
        """(origin, request target) of an absolute URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HTTPError(f"unsupported URL {url!r}")
        origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        return origin, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def _send(self, method: str, url: str, body: bytes | None, headers: dict | None) -> http.client.HTTPResponse:
        origin, target = self._split(url)
        hdrs = dict(headers or {})
        given = {k.lower() for k in hdrs}
        for name, value in DEFAULT_HEADERS.items():
            if name.lower() not in given:
                hdrs[name] = value
        if body is not None:
            hdrs["Content-Length"] = str(len(body))
        for attempt in (1, 2):
            conn, reused = self._connection(origin)
            try:
                conn.request(method, target, body=body, headers=hdrs)
                return conn.getresponse()
            except STALE_CONNECTION as exc:
                conn.close()
                if not reused or attempt == 2:
                    raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
            except CONNECTION_ERRORS as exc:
                conn.close()
                raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def request(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> Response:
        raw = self._send(method, url, body, headers)
        try:
            data = raw.read()
            content = decode_body(data, raw.headers.get("content-encoding", ""))
        except (*CONNECTION_ERRORS, zlib.error) as exc:
            raw.close()
            self._drop(url)
            raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
        return Response(raw.status, raw.headers, content)

    def get(self, url: str, headers: dict | None = None) -> Response:
        return self.request("GET", url, headers=headers)

    def post(self, url: str, content: bytes, headers: dict | None = None) -> Response:
        return self.request("POST", url, body=content, headers=headers)

    @contextmanager
    def stream(self, method: str, url: str, headers: dict | None = None) -> Iterator[StreamResponse]:
        """Send a request and let the caller read the body; whatever is left unread is drained so
        that the connection can be kept."""
        raw = self._send(method, url, None, headers)
        ok = False
        try:
            response = StreamResponse(raw)
            yield response
            while raw.read(1 << 20):
                pass
            response.check_complete()
            ok = True
        except (*CONNECTION_ERRORS, zlib.error) as exc:
            raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            raw.close()
            if not ok:
                self._drop(url)

    def _drop(self, url: str) -> None:
        """Close the connection to url's origin (after a failure mid-response, or a body left unread)."""
        conn = self._conns.get(self._split(url)[0])
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


# --------------------------------------------------------------------------------------------
# HTTP helpers and results
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    base: str
    client: Client


@dataclass
class Sample:
    """Measurements of one table cell (one target, one row)."""

    latencies: list[float] = field(default_factory=list)  # seconds
    bytes: int = 0
    items: int = 0
    elapsed: float = 0.0
    errors: Counter = field(default_factory=Counter)

    def error(self, message: str) -> None:
        self.errors[message[:200]] += 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def make_client(timeout: float) -> Client:
    return Client(timeout)


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in value.split(";")]
    params = {}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            params[k.strip().lower()] = v.strip().strip('"')
    return parts[0].lower(), params


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body into (headers, payload) parts."""
    _, params = content_type_params(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise ValueError(f"no boundary in Content-Type {content_type!r}")
    delim = b"--" + boundary.encode()
    parts = []
    pos = body.find(delim)
    if pos < 0:
        raise ValueError("boundary not found in body")
    while True:
        pos += len(delim)
        if body[pos : pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ValueError("truncated part headers")
        headers = {}
        for line in body[pos:head_end].split(b"\r\n"):
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise ValueError("missing closing boundary")
        parts.append((headers, body[head_end + 4 : nxt]))
        pos = nxt + 2


def with_query(path: str, params: dict | None) -> str:
    """Append a query string, leaving the characters of DICOM query values that are legal in a URL
    query literal (Orthanc 1.10 does not percent-decode QIDO parameters, so `^` must not become
    `%5E`)."""
    if not params:
        return path
    return path + "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='^*?-.,:')}" for k, v in params.items())


def json_count(response: Response) -> int:
    if response.status_code == 204 or not response.content:
        return 0
    data = response.json()
    if not isinstance(data, list):
        raise ValueError("response is not a JSON array")
    return len(data)


def describe(response: Response) -> str:
    text = response.text[:120].replace("\n", " ") if response.content else ""
    return f"HTTP {response.status_code} {text}".strip()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def orders(targets: list[Target], rounds: int):
    """Yield (round, target) alternating which target goes first in each round."""
    for r in range(rounds):
        seq = targets if r % 2 == 0 else list(reversed(targets))
        for t in seq:
            yield r, t


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


def stow_body(paths: list[Path]) -> bytes:
    chunks = []
    for p in paths:
        chunks.append(f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(p.read_bytes())
        chunks.append(b"\r\n")
    chunks.append(f"--{STOW_BOUNDARY}--\r\n".encode())
    return b"".join(chunks)


def stow_request(client: Client, base: str, body: bytes, n: int, sample: Sample, lock: threading.Lock):
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}',
        "Accept": DICOM_JSON,
    }
    try:
        r = client.post(f"{base}/studies", content=body, headers=headers)
    except HTTPError as exc:
        with lock:
            sample.error(f"{type(exc).__name__}: {exc}")
        return
    problem = None
    if r.status_code != 200:
        problem = describe(r)
    else:
        try:
            doc = r.json() if r.content else {}
            failed = len(doc.get("00081198", {}).get("Value", []))
            stored = len(doc.get("00081199", {}).get("Value", []))
            if failed:
                problem = f"{failed} instance(s) in FailedSOPSequence"
            elif stored != n:
                problem = f"ReferencedSOPSequence has {stored} item(s), sent {n}"
        except ValueError:
            problem = "STOW response is not JSON"
    with lock:
        if problem:
            sample.error(problem)
        else:
            sample.items += n
        sample.bytes += len(body)


def run_stow(
    targets: list[Target], data: DataSet, clients_opts: list[int], batch_opts: list[int], timeout: float
) -> tuple[list[str], dict]:
    instances = data.ordinary
    configs = [(c, b) for c in clients_opts for b in batch_opts]
    shares = _split(len(instances), len(configs))
    rows, cells = [], {}
    start = 0
    for idx, ((n_clients, batch), share) in enumerate(zip(configs, shares, strict=True)):
        chunk = instances[start : start + share]
        start += share
        plural = "s" if n_clients > 1 else ""
        label = f"{n_clients} client{plural} × {batch} inst/request ({len(chunk)} inst), inst/s"
        rows.append(label)
        bodies = [
            (stow_body([i.path for i in chunk[k : k + batch]]), len(chunk[k : k + batch]))
            for k in range(0, len(chunk), batch)
        ]
        order = targets if idx % 2 == 0 else list(reversed(targets))
        for t in order:
            log(f"STOW {t.name}: {len(chunk)} instances, {n_clients} client(s), {batch}/request")
            sample = Sample()
            lock = threading.Lock()
            local = threading.local()
            made: list[Client] = []

            def work(item, t=t, sample=sample, lock=lock, local=local, made=made):
                if not hasattr(local, "client"):
                    local.client = make_client(timeout)
                    with lock:
                        made.append(local.client)
                stow_request(local.client, t.base, item[0], item[1], sample, lock)

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=n_clients) as pool:
                list(pool.map(work, bodies))
            sample.elapsed = time.perf_counter() - t0
            for c in made:
                c.close()
            cells[(label, t.name)] = sample
        del bodies
    # The multi-frame instance is stored untimed on every target.
    for t in targets:
        sample = Sample()
        stow_request(t.client, t.base, stow_body([data.multiframe.path]), 1, sample, threading.Lock())
        if sample.error_count:
            cells.setdefault(("multi-frame instance (untimed)", t.name), sample)
    if any(k[0] == "multi-frame instance (untimed)" for k in cells):
        rows.append("multi-frame instance (untimed)")
    return rows, cells


def timed_get(t: Target, path: str, params: dict | None, accept: str, sample: Sample) -> Response | None:
    try:
        t0 = time.perf_counter()
        r = t.client.get(t.base + with_query(path, params), headers={"Accept": accept})
        sample.latencies.append(time.perf_counter() - t0)
    except HTTPError as exc:
        sample.error(f"{type(exc).__name__}: {exc}")
        return None
    if r.status_code not in (200, 204):
        sample.error(describe(r))
        return None
    return r


def qido_queries(data: DataSet, rng: random.Random, n: int) -> dict[str, list[tuple[str, dict, int]]]:
    studies = data.studies
    ordinary_studies = [s for s in studies if s.uid != data.multiframe.study]
    patients: dict[str, list[Study]] = defaultdict(list)
    for s in studies:
        patients[s.patient_id].append(s)
    all_series = data.all_series
    modalities = sorted({se.modality for se in all_series})
    instances = data.ordinary
    out: dict[str, list[tuple[str, dict, int]]] = defaultdict(list)
    for _ in range(n):
        st = rng.choice(ordinary_studies)
        out["/studies?PatientID="].append(("/studies", {"PatientID": st.patient_id}, len(patients[st.patient_id])))
        st = rng.choice(ordinary_studies)
        out["/studies?PatientName="].append(
            ("/studies", {"PatientName": st.patient_name}, sum(s.patient_name == st.patient_name for s in studies))
        )
        d1 = rng.choice(ordinary_studies).date
        d2 = d1 + dt.timedelta(days=30)
        out["/studies?StudyDate=range (31 days)"].append(
            ("/studies", {"StudyDate": f"{d1:%Y%m%d}-{d2:%Y%m%d}"}, sum(d1 <= s.date <= d2 for s in studies))
        )
        offset = rng.randrange(0, max(1, len(studies) - 25 + 1))
        out["/studies?limit=25&offset=N"].append(
            ("/studies", {"limit": "25", "offset": str(offset)}, min(25, len(studies) - offset))
        )
        st = rng.choice(ordinary_studies)
        out["/studies/{s}/series"].append((f"/studies/{st.uid}/series", {}, len(st.series)))
        # limit=100: servers may cap unpaged results (100 is a common default), and an uncapped
        # CT query returns every CT series, which is no common query.
        m = modalities[_ % len(modalities)]
        out["/series?Modality=&limit=100"].append(
            ("/series", {"Modality": m, "limit": "100"}, min(100, sum(se.modality == m for se in all_series)))
        )
        se = rng.choice([se for se in rng.choice(ordinary_studies).series])
        out["/studies/{s}/series/{se}/instances"].append(
            (f"/studies/{se.study}/series/{se.uid}/instances", {}, len(se.instances))
        )
        inst = rng.choice(instances)
        out["/instances?SOPInstanceUID="].append(("/instances", {"SOPInstanceUID": inst.sop}, 1))
    return out


def run_interleaved(
    targets: list[Target], jobs: dict[str, list], what: str, measure: Callable[[Target, object, Sample], None]
) -> tuple[list[str], dict]:
    """For each labelled job list: one Sample per target, requests alternating between targets, ``measure`` doing
    one request and its checks."""
    rows, cells = [], {}
    for label, items in jobs.items():
        rows.append(label)
        log(f"{what} {label}: {len(items)} requests per target")
        for t in targets:
            cells[(label, t.name)] = Sample()
        for r, t in orders(targets, len(items)):
            measure(t, items[r], cells[(label, t.name)])
    return rows, cells


def run_json_phase(
    targets: list[Target], queries: dict[str, list[tuple[str, dict, int]]], what: str
) -> tuple[list[str], dict]:
    for t in targets:
        timed_get(t, "/studies", {"limit": "1"}, DICOM_JSON, Sample())  # warm-up

    def measure(t: Target, item, sample: Sample) -> None:
        path, params, expected = item
        resp = timed_get(t, path, params, DICOM_JSON, sample)
        if resp is None:
            return
        try:
            got = json_count(resp)
        except ValueError as exc:
            sample.error(f"bad JSON: {exc}")
            return
        sample.bytes += len(resp.content)
        if got != expected:
            warning = resp.headers.get("warning")
            sample.error(
                f"wrong result count (expected {expected}, got {got})" + (f"; Warning: {warning}" if warning else "")
            )

    return run_interleaved(targets, queries, what, measure)


def metadata_queries(data: DataSet, rng: random.Random, n: int) -> dict[str, list[tuple[str, dict, int]]]:
    ordinary_studies = [s for s in data.studies if s.uid != data.multiframe.study]
    out: dict[str, list[tuple[str, dict, int]]] = {"study metadata": [], "series metadata": [], "instance metadata": []}
    instances = data.ordinary
    for _ in range(n):
        st = rng.choice(ordinary_studies)
        out["study metadata"].append((f"/studies/{st.uid}/metadata", {}, len(st.instances)))
        se = rng.choice(rng.choice(ordinary_studies).series)
        out["series metadata"].append((f"/studies/{se.study}/series/{se.uid}/metadata", {}, len(se.instances)))
        inst = rng.choice(instances)
        out["instance metadata"].append(
            (f"/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}/metadata", {}, 1)
        )
    return out


def stream_retrieve(t: Target, path: str, sample: Sample) -> int | None:
    """GET a multipart/related DICOM retrieve, consuming the body; returns the number of parts."""
    try:
        t0 = time.perf_counter()
        with t.client.stream("GET", f"{t.base}{path}", headers={"Accept": ACCEPT_STUDY}) as r:
            if r.status_code != 200:
                r.read()
                sample.latencies.append(time.perf_counter() - t0)
                sample.error(describe(r))
                return None
            _, params = content_type_params(r.headers.get("content-type", ""))
            delim = b"--" + params.get("boundary", "\x00no-boundary").encode()
            count = 0
            size = 0
            tail = b""
            for chunk in r.iter_raw(1 << 20):
                size += len(chunk)
                buf = tail + chunk
                count += buf.count(delim) - tail.count(delim)
                tail = buf[-(len(delim) - 1) :]
            elapsed = time.perf_counter() - t0
    except HTTPError as exc:
        sample.error(f"{type(exc).__name__}: {exc}")
        return None
    sample.latencies.append(elapsed)
    sample.elapsed += elapsed
    sample.bytes += size
    return max(0, count - 1)


def run_wado(targets: list[Target], data: DataSet, rng: random.Random, n: int) -> tuple[list[str], dict]:
    ordinary_studies = [s for s in data.studies if s.uid != data.multiframe.study]
    studies = rng.sample(ordinary_studies, min(n, len(ordinary_studies)))
    series = [rng.choice(s.series) for s in studies]
    jobs = {
        "study retrieve": [(f"/studies/{s.uid}", len(s.instances)) for s in studies],
        "series retrieve": [(f"/studies/{s.study}/series/{s.uid}", len(s.instances)) for s in series],
    }

    def measure(t: Target, item, sample: Sample) -> None:
        path, expected = item
        parts = stream_retrieve(t, path, sample)
        if parts is None:
            return
        if parts != expected:
            sample.error(f"wrong number of parts (expected {expected}, got {parts})")
        else:
            sample.items += parts

    return run_interleaved(targets, jobs, "WADO", measure)


def run_frames(targets: list[Target], data: DataSet, rng: random.Random, n: int) -> tuple[list[str], dict]:
    mf = data.multiframe
    mf_frames = [rng.randint(1, mf.frames) for _ in range(n)]
    ordinary = data.ordinary
    singles = [rng.choice(ordinary) for _ in range(n)]
    jobs = {
        f"multi-frame instance ({mf.frames} frames), random frame": [(mf, k) for k in mf_frames],
        "single-frame instances, frame 1": [(i, 1) for i in singles],
    }
    expected_cache: dict[tuple[str, int], bytes] = {}

    def measure(t: Target, item, sample: Sample) -> None:
        inst, number = item
        path = f"/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}/frames/{number}"
        resp = timed_get(t, path, None, ACCEPT_FRAME, sample)
        if resp is None:
            return
        sample.bytes += len(resp.content)
        try:
            parts = parse_multipart(resp.content, resp.headers.get("content-type", ""))
        except ValueError as exc:
            sample.error(f"bad multipart: {exc}")
            return
        key = (inst.sop, number)
        if key not in expected_cache:
            expected_cache[key] = expected_frame(data, inst, number)
        if len(parts) != 1:
            sample.error(f"expected 1 part, got {len(parts)}")
        elif parts[0][1] != expected_cache[key]:
            sample.error(f"frame bytes differ from the stored pixel data ({len(parts[0][1])} bytes)")

    return run_interleaved(targets, jobs, "frames", measure)


def run_rendered(targets: list[Target], data: DataSet, rng: random.Random, n: int) -> tuple[list[str], dict]:
    """Rendered frames and instances (JPEG), and thumbnails made then asked for again (served from a cache where
    the server keeps one). A target that does not serve thumbnails (Orthanc's DICOMweb plugin) is left out of the
    thumbnail rows."""
    mf = data.multiframe
    full = (data.cols, data.rows)
    singles = [rng.choice(data.ordinary) for _ in range(n)]
    thumbs = rng.sample(data.ordinary[1:], min(n, len(data.ordinary) - 1))
    frame_label = f"rendered frame, multi-frame instance ({mf.frames} frames), random frame"
    rendered_jobs = {
        frame_label: [(mf, f"/frames/{rng.randint(1, mf.frames)}/rendered", full) for _ in range(n)],
        "rendered single-frame instance": [(i, "/rendered", full) for i in singles],
    }
    thumbnail_jobs = {
        "thumbnail, single-frame instance (first request)": [(i, "/thumbnail", None) for i in thumbs],
        "thumbnail, the same instances again": [(i, "/thumbnail", None) for i in thumbs],
    }

    def path_of(inst: Instance, suffix: str) -> str:
        return f"/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}{suffix}"

    def measure(t: Target, item, sample: Sample) -> None:
        inst, suffix, size = item
        resp = timed_get(t, path_of(inst, suffix), None, "image/jpeg", sample)
        if resp is None:
            return
        sample.bytes += len(resp.content)
        try:
            image = Image.open(io.BytesIO(resp.content))
            image.load()
        except Exception as exc:
            sample.error(f"not an image: {exc}")
            return
        if image.format != "JPEG":
            sample.error(f"expected JPEG, got {image.format}")
        elif size is not None and image.size != size:
            sample.error(f"expected {size[0]}x{size[1]}, got {image.size[0]}x{image.size[1]}")
        elif size is None and max(image.size) > 128:
            sample.error(f"thumbnail of {image.size[0]}x{image.size[1]}")
        else:
            sample.items += 1

    rows, cells = run_interleaved(targets, rendered_jobs, "rendered", measure)
    probe = path_of(data.ordinary[0], "/thumbnail")
    serving = [t for t in targets if t.client.get(t.base + probe, headers={"Accept": "image/jpeg"}).status_code == 200]
    for t in targets:
        if t not in serving:
            log(f"thumbnail: {t.name} does not serve thumbnails; left out")
    more_rows, more_cells = run_interleaved(serving, thumbnail_jobs, "thumbnail", measure)
    return rows + more_rows, {**cells, **more_cells}


@dataclass
class Compressed:
    """One JPEG 2000 lossless instance of the transcode phase: its stored frame and the pixels it decodes to."""

    instance: Instance
    codestream: bytes
    pixels: bytes


def generate_j2k(data: DataSet, count: int, seed: int) -> list[Compressed]:
    """``count`` single-frame instances of the data set, compressed to JPEG 2000 lossless (pydicom + OpenJPEG), in a
    study of their own."""
    root = data.root / "j2k"
    root.mkdir(exist_ok=True)
    study, series = _uid(seed, "j2k-study"), _uid(seed, "j2k-series")
    out = []
    for k, source in enumerate(data.ordinary[:count]):
        ds = pydicom.dcmread(source.path)
        pixels = ds.PixelData
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = _uid(seed, "j2k-instance", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        path = root / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
        out.append(Compressed(Instance(study, series, ds.SOPInstanceUID, path), codestream, pixels))
    return out


def run_transcode(targets: list[Target], data: DataSet, rng: random.Random, n: int) -> tuple[list[str], dict]:
    """JPEG 2000 lossless instances (stored untimed first): a frame decoded to uncompressed, the frame as stored,
    and the whole instance transcoded to explicit VR little endian (ms per MB of what is sent)."""
    j2k = generate_j2k(data, 20, data.seed)
    for t in targets:  # a conflict on a second run against the same servers is no error
        stow_request(t.client, t.base, stow_body([c.instance.path for c in j2k]), len(j2k), Sample(), threading.Lock())
    picks = [rng.choice(j2k) for _ in range(n)]
    jobs = {
        "J2K frame 1 → uncompressed (transfer-syntax=1.2.840.10008.1.2.1)": [
            (c, "frame", ACCEPT_FRAME_UNCOMPRESSED) for c in picks
        ],
        "J2K frame 1 as stored (transfer-syntax=*)": [(c, "frame", ACCEPT_FRAME) for c in picks],
        "J2K instance → explicit VR LE (whole file)": [(c, "instance", ACCEPT_INSTANCE_EXPLICIT) for c in picks],
    }

    def measure(t: Target, item, sample: Sample) -> None:
        c, kind, accept = item
        inst = c.instance
        path = f"/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}" + (
            "/frames/1" if kind == "frame" else ""
        )
        t0 = time.perf_counter()
        resp = timed_get(t, path, None, accept, sample)
        if resp is None:
            return
        sample.elapsed += time.perf_counter() - t0
        sample.bytes += len(resp.content)
        try:
            parts = parse_multipart(resp.content, resp.headers.get("content-type", ""))
        except ValueError as exc:
            sample.error(f"bad multipart: {exc}")
            return
        if len(parts) != 1:
            sample.error(f"expected 1 part, got {len(parts)}")
            return
        body = parts[0][1]
        if kind == "instance":
            ds = pydicom.dcmread(io.BytesIO(body))
            ok = ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian and ds.PixelData == c.pixels
        else:
            ok = body == (c.codestream if accept == ACCEPT_FRAME else c.pixels)
        if ok:
            sample.items += 1
        else:
            sample.error(f"{kind} bytes differ from the expected ones ({len(body)} bytes)")

    return run_interleaved(targets, jobs, "transcode", measure)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt(v: float, digits: int = 1) -> str:
    if v != v:  # NaN
        return "–"
    return f"{v:,.{digits}f}"


def table(title_cols: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(title_cols) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(title_cols))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(
    targets: list[Target],
    row_labels: list[str],
    cells: dict,
    metrics: list[tuple[str, Callable[[Sample], float], int]],
    label_header: str,
) -> str:
    """metrics: (suffix, function(Sample) -> float, digits).  One table row per (row, metric)."""
    names = [t.name for t in targets]
    cols = [label_header] + names
    with_ratio = len(names) >= 2
    if with_ratio:
        cols.append(f"ratio {names[0]}/{names[1]}")
    out_rows = []
    for label in row_labels:
        for suffix, fn, digits in metrics:
            vals, cells_txt = [], []
            for n in names:
                s = cells.get((label, n))
                if s is None:
                    vals.append(float("nan"))
                    cells_txt.append("–")
                    continue
                v = fn(s) if (s.latencies or s.items or s.elapsed) else float("nan")
                vals.append(v)
                txt = fmt(v, digits)
                if s.error_count:
                    txt += f" **({s.error_count} err)**"
                cells_txt.append(txt)
            row = [f"{label}{suffix}"] + cells_txt
            if with_ratio:
                a, b = vals[0], vals[1]
                row.append(fmt(a / b, 2) if a == a and b == b and b != 0 else "–")
            out_rows.append(row)
    text = table(cols, out_rows)
    errs = []
    for label in row_labels:
        for n in names:
            s = cells.get((label, n))
            if s is not None and s.error_count:
                top = "; ".join(f"{c} × {m}" for m, c in s.errors.most_common(3))
                errs.append(f"- **{n}**, {label}: {s.error_count} error(s): {top}")
    if errs:
        text += "\n\nErrors:\n\n" + "\n".join(errs)
    return text


def ms_median(s: Sample) -> float:
    return percentile(s.latencies, 50) * 1000


def ms_p95(s: Sample) -> float:
    return percentile(s.latencies, 95) * 1000


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_target(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError("expected NAME=URL")
    name, url = value.split("=", 1)
    if not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError("expected NAME=http://host:port/base")
    return name, url.rstrip("/")


def int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return out


LATENCY = [(" — median", ms_median, 2), (" — p95", ms_p95, 2)]


def ms_per_mb(s: Sample) -> float:
    return s.elapsed * 1000 / (s.bytes / 1e6) if s.bytes else float("nan")


@dataclass(frozen=True)
class Phase:
    """One section of the report: how to run it (targets, data, rng, args) -> (row labels, cells) and what to show."""

    name: str
    title: str
    label_header: str
    run: Callable[[list[Target], DataSet, random.Random, argparse.Namespace], tuple[list[str], dict]]
    metrics: list[tuple[str, Callable[[Sample], float], int]]


PHASE_LIST = [
    Phase(
        "stow",
        "STOW-RS (higher is better)",
        "configuration",
        lambda targets, data, rng, args: run_stow(targets, data, args.stow_clients, args.stow_batches, args.timeout),
        [("", lambda s: s.items / s.elapsed if s.elapsed else float("nan"), 1)],
    ),
    Phase(
        "qido",
        "QIDO-RS latency, ms (lower is better)",
        "query",
        lambda targets, data, rng, args: run_json_phase(targets, qido_queries(data, rng, args.requests), "QIDO"),
        LATENCY,
    ),
    Phase(
        "metadata",
        "WADO-RS metadata latency, ms (lower is better)",
        "request",
        lambda targets, data, rng, args: run_json_phase(
            targets, metadata_queries(data, rng, args.metadata_requests), "metadata"
        ),
        LATENCY,
    ),
    Phase(
        "wado",
        "WADO-RS retrieve, `transfer-syntax=*` (MB/s: higher is better)",
        "request",
        lambda targets, data, rng, args: run_wado(targets, data, rng, args.retrieves),
        [
            (" — MB/s", lambda s: s.bytes / 1e6 / s.elapsed if s.elapsed else float("nan"), 1),
            (" — median ms", ms_median, 1),
        ],
    ),
    Phase(
        "frames",
        "WADO-RS single frame latency, ms (lower is better)",
        "request",
        lambda targets, data, rng, args: run_frames(targets, data, rng, args.requests),
        LATENCY,
    ),
    Phase(
        "rendered",
        "Rendered images and thumbnails (JPEG), latency ms (lower is better)",
        "request",
        lambda targets, data, rng, args: run_rendered(targets, data, rng, args.requests),
        LATENCY,
    ),
    Phase(
        "transcode",
        "Transcoding from JPEG 2000 lossless, latency ms and ms per MB sent (lower is better)",
        "request",
        lambda targets, data, rng, args: run_transcode(targets, data, rng, args.requests),
        [*LATENCY, (" — ms per MB sent", ms_per_mb, 2)],
    ),
]
PHASES = [phase.name for phase in PHASE_LIST]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark DICOMweb services (STOW-RS, QIDO-RS, metadata, WADO-RS, frames) on the "
        "same generated data set, alternating between targets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target",
        action="append",
        type=parse_target,
        required=True,
        metavar="NAME=URL",
        help="DICOMweb base URL, e.g. orthanc=http://127.0.0.1:18042/dicom-web (repeatable; "
        "the ratio column is first/second)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=None,
        help="single-frame instances in the data set (default 2000, or 20000 with --large)",
    )
    p.add_argument("--large", action="store_true", help="large data set: 20,000 instances")
    p.add_argument("--studies", type=int, default=None, help="number of studies (default instances/20)")
    p.add_argument("--series-per-study", type=int, default=2)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=256)
    p.add_argument("--frames", type=int, default=50, help="frames of the multi-frame instance")
    p.add_argument("--stow-clients", type=int_list, default=[1, 4], help="concurrent STOW clients")
    p.add_argument("--stow-batches", type=int_list, default=[1, 50], help="instances per STOW request")
    p.add_argument("--requests", type=int, default=100, help="requests per QIDO query and per frames row")
    p.add_argument("--metadata-requests", type=int, default=50, help="requests per metadata level")
    p.add_argument("--retrieves", type=int, default=30, help="studies (and series) retrieved by WADO")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of " + ",".join(PHASES) + " (without stow the data "
        "must already be stored, from a run with the same seed and sizes)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed for UIDs, values and request choice")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to write the data set (default: a temporary directory, removed at the end)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the generated data set")
    p.add_argument("--allow-nonempty", action="store_true", help="run STOW even if a target already holds studies")
    p.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout in seconds")
    p.add_argument("--output", type=Path, default=None, help="also write the Markdown report to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"unknown phase(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    names = [n for n, _ in args.target]
    if len(set(names)) != len(names):
        print("target names must be distinct", file=sys.stderr)
        return 2
    n_instances = args.instances or (20000 if args.large else 2000)
    n_studies = args.studies or max(1, n_instances // 20)
    targets = [Target(n, u, make_client(args.timeout)) for n, u in args.target]

    # Targets must answer, and (for STOW) be empty.
    for t in targets:
        try:
            r = t.client.get(f"{t.base}/studies?limit=1", headers={"Accept": DICOM_JSON})
        except HTTPError as exc:
            print(f"target {t.name} ({t.base}) does not answer: {exc}", file=sys.stderr)
            return 2
        if r.status_code not in (200, 204):
            print(f"target {t.name}: GET /studies?limit=1 gave {describe(r)}", file=sys.stderr)
            return 2
        if "stow" in phases and json_count(r) and not args.allow_nonempty:
            print(
                f"target {t.name} already holds studies; start it with an empty data store (or pass --allow-nonempty)",
                file=sys.stderr,
            )
            return 2

    tmp = None
    if args.data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="dicomhub-bench-"))
        data_dir = tmp
    else:
        data_dir = args.data_dir
    try:
        log(f"generating {n_instances} instances in {n_studies} studies under {data_dir}")
        t0 = time.perf_counter()
        data = generate_dataset(
            data_dir, n_instances, n_studies, args.series_per_study, args.rows, args.cols, args.frames, args.seed
        )
        total_mb = data.total_bytes() / 1e6
        log(f"data set written in {time.perf_counter() - t0:.1f} s ({total_mb:.1f} MB)")
        rng = random.Random(args.seed + 1)
        started = dt.datetime.now().astimezone()
        sections = []

        for phase in PHASE_LIST:
            if phase.name in phases:
                rows, cells = phase.run(targets, data, rng, args)
                sections.append((phase.title, render(targets, rows, cells, phase.metrics, phase.label_header)))

        n_series = len(data.all_series)
        header = [
            "# DICOMweb benchmark",
            "",
            f"- started: {started:%Y-%m-%d %H:%M:%S %z}; finished: {dt.datetime.now().astimezone():%H:%M:%S}",
            "- targets: " + ", ".join(f"**{t.name}** `{t.base}`" for t in targets),
            f"- data set: {n_instances} single-frame instances in {len(data.studies) - 1} studies / "
            f"{n_series - 1} series ({args.rows}×{args.cols}, 16-bit MONOCHROME2, explicit VR little "
            f"endian, uncompressed), plus 1 multi-frame instance ({args.frames} frames) in its own study; "
            f"{total_mb:.1f} MB; seed {args.seed}",
            f"- client: Python {platform.python_version()} `http.client` (one keep-alive connection per target "
            f"and thread, `Accept-Encoding: gzip, deflate`), pydicom {pydicom.__version__}; requests alternate between "
            "targets (first target swapped every round); QIDO values are sent with `^` unescaped; latency "
            "includes reading the whole body; every answer is checked (status, result/part count, frame "
            "bytes) and failures are counted as errors",
        ]
        if len(targets) >= 2:
            header.append(f"- ratio = {targets[0].name} / {targets[1].name}")
        report = "\n".join(header) + "\n"
        for i, (title, body) in enumerate(sections, 1):
            report += f"\n## {i}. {title}\n\n{body}\n"
        print(report)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(report)
            log(f"report written to {args.output}")
        return 0
    finally:
        for t in targets:
            t.client.close()
        if tmp is not None and not args.keep_data:
            shutil.rmtree(tmp, ignore_errors=True)
        elif args.keep_data:
            log(f"data set kept in {data_dir}")


if __name__ == "__main__":
    sys.exit(main())
