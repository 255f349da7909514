#!/usr/bin/env python3
"""A fuzz campaign against a running dicomhub server (not part of the test suite).

Every route of the server's ``/openapi.json`` (plus the ``/partitions/{name}`` variants of the Studies routes) is
called with mutated path segments (UIDs, frames, versions, tag paths), query strings, headers and bodies: multipart
and single-part STOW bodies of real DICOM files made with pydicom and then damaged (wrong VRs, bad lengths, cut
short, deeply nested sequences, flipped bytes), and JSON bodies for extended query tags and bulk update.

Status codes are counted; every 5xx and every dropped connection is printed with the request that caused it, and the
exit status is 1 if there was any. Bounded by ``--requests`` and ``--seconds``; ``--seed`` makes a run repeatable.

    python scripts/fuzz.py --url http://127.0.0.1:8080 --requests 10000 --seconds 900 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import re
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

STUDY_ROUTERS = ("/studies", "/series", "/instances")  # the routes that also exist under /partitions/{name}
QUERY_KEYS = [
    "PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
    "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "SOPClassUID",
    "ModalitiesInStudy", "PerformedProcedureStepStartDate", "00100010", "0020000D", "00080020", "includefield",
    "limit", "offset", "fuzzymatching", "accept", "quality", "window", "viewport", "bulkdata", "startTime", "endTime",
    "includeMetadata", "StationName", "annotation", "charset",
]  # fmt: skip
TEXTS = [
    "", "*", "?", "all", "true", "false", "-1", "0", "1", "201", "99999999999999999999", "1e3", "NaN", "1.2.3",
    "1.2.3,1.2.4", "1.2.3\\1.2.4", "20240101-20240102", "-20240101", "20240101-", "2024", "20241301", "120000-",
    "Test*", "test pat", "PatientName,StudyDate", "NumberOfStudyRelatedInstances", "\x00", "a\nb", "A" * 5000,
    "٢٠٢٤٠١٠١", "１", "²", "①", "<script>", "%", "%%", "..", "/", "\\", "'", '"', "é", "\u202e", "\ufeff", " ",
    "2024-01-01T00:00:00Z", "2024-01-01T00:00:00", "9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-14:00",
    "100,100", "0,0", "40,400,linear", "1,1,sigmoid", "8193,8193", "10,10,0,0,5,5", "10,10,-1,0,0,0", "uri", "omit",
    "image/png", "image/jpeg", "application/dicom+json", "*/*", "7FE00010", "00091001", "0040A730.0.0040A160",
]  # fmt: skip
ACCEPTS = [
    "*/*", "application/dicom+json", "application/json", "application/dicom", "application/dicom; transfer-syntax=*",
    'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90',
    'multipart/related; type="application/octet-stream"', "application/octet-stream; transfer-syntax=*",
    'multipart/related; type="image/jp2"', "image/png", "image/jpeg", "image/gif", "image/*", "text/html",
    "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50", "application/dicom; transfer-syntax=9.9",
    'multipart/related; type="application/dicom"; transfer-syntax="1.2.840.10008.1.2.5"', "", ";;;", "x/y; q=abc",
]  # fmt: skip
UPDATABLE = ["00100010", "00100020", "00100030", "00100040", "00101010", "00101020", "00101030", "00080050",
             "00080090", "00081030", "00104000", "00080060", "0020000D", "00101002"]  # fmt: skip
VRS = ["PN", "LO", "SH", "CS", "DA", "TM", "DT", "AS", "DS", "IS", "LT", "UI", "SQ", "OB", "US", "FD", "XX", ""]


@dataclass
class Stored:
    """What the campaign stored first, so that most requests address something that exists."""

    study: str
    series: str
    sop: str
    frames: int


@dataclass
class Campaign:
    url: str
    rng: random.Random
    partitions: bool
    routes: list[tuple[str, str]]
    stored: list[Stored] = field(default_factory=list)
    files: list[bytes] = field(default_factory=list)  # of the stored instances, stored again after a delete
    counts: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    previous: str = ""  # the request before: a connection it broke shows on the next request of that connection

    # -- values ------------------------------------------------------------------------------------------------------
    def text(self) -> str:
        rng = self.rng
        kind = rng.random()
        if kind < 0.5:
            return rng.choice(TEXTS)
        if kind < 0.8:
            return mutate_text(rng, rng.choice(TEXTS) or "1.2.3")
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000)])) for _ in range(rng.randrange(12))
        )

    def uid(self, real: str) -> str:
        rng = self.rng
        kind = rng.random()
        if kind < 0.9:
            return real
        if kind < 0.95:
            return mutate_text(rng, real)
        return self.text()

    def frames(self, count: int) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return ",".join(str(rng.randint(1, count)) for _ in range(rng.randint(1, 3)))
        return rng.choice(["0", "-1", str(count + 1), "1,1", "1,,2", " 1", "2147483648", "99999999999999999999", "²",
                           "①", "1,٣", "１", "1.0", "1e2", "", ",", self.text()])  # fmt: skip

    def path(self, template: str) -> str:
        rng = self.rng
        target = rng.choice(self.stored)
        values = {
            "version": rng.choice(["1", "2"] * 20 + ["1.0-prerelease", "3", "0", "2.0", self.text()]),
            "partition_name": rng.choice(["Microsoft.Default"] * 6 + ["p-fuzz", "a\n", "x" * 65, self.text()]),
            "study": self.uid(target.study),
            "series": self.uid(target.series),
            "instance": self.uid(target.sop),
            "frames": self.frames(target.frames),
            "path": rng.choice(["7FE00010", "00091001", "00281201", "0040A730/0/0040A160", "7FE00010/1", self.text()]),
            "tag_path": rng.choice(["StationName", "00191001", "PatientAge", "00100010", "Nope", self.text()]),
            "operation_id": rng.choice(["0" * 32, "not-a-guid", "f" * 32, self.text()]),
        }
        return re.sub(r"\{(\w+)\}", lambda m: quote(values.get(m.group(1), self.text()), safe=""), template)

    def query(self) -> str:
        rng = self.rng
        pairs = []
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 5])):
            key = rng.choice(QUERY_KEYS) if rng.random() < 0.85 else self.text()
            pairs.append(f"{quote(key, safe='')}={quote(self.text(), safe='')}")
        if rng.random() < 0.05:
            pairs.append(quote(rng.randbytes(rng.randrange(1, 8))))
        return "&".join(pairs)

    def headers(self) -> dict[str, str]:
        rng = self.rng
        headers = {"Accept": rng.choice(ACCEPTS)}
        if rng.random() < 0.1:
            headers["Accept"] = mutate_text(rng, headers["Accept"])
        if rng.random() < 0.1:
            headers["Range"] = rng.choice(["bytes=0-10", "bytes=-5", "bytes=5-", "bytes=10-1", "bytes=0-0,2-3",
                                           "bytes=99999999999999999999-", "items=1-2", "bytes=٣-"])  # fmt: skip
        if rng.random() < 0.05:
            headers["If-None-Match"] = rng.choice(['"1-1"', "*", 'W/"x"', '"', self.text()])
        if rng.random() < 0.05:
            headers["msdicom-request-original"] = rng.choice(["true", "false", "yes", ""])
        return {k: v for k, v in headers.items() if is_header_value(v)}

    # -- bodies ------------------------------------------------------------------------------------------------------
    def dicom(self) -> bytes:
        rng = self.rng
        target = rng.choice(self.stored) if self.stored and rng.random() < 0.3 else None
        data = make_file(rng, study=target.study if target else None)
        kind = rng.random()
        if kind < 0.3:
            return data
        if kind < 0.5:
            return damage_vr(rng, data)
        if kind < 0.65:
            return data[: rng.randrange(0, len(data))]
        if kind < 0.75:
            return make_file(rng, depth=rng.choice([10, 40, 200, 1000]))
        return flip_bytes(rng, data)

    def stow_body(self) -> tuple[str, bytes]:
        rng = self.rng
        if rng.random() < 0.3:
            return rng.choice(["application/dicom"] * 4 + ["application/dicom; transfer-syntax=*", ""]), self.dicom()
        boundary = rng.choice(["b0", "x" * 70, "x" * 71, "x" * 300, "a b", "'()+_,-./:=?", self.text() or "b1"])
        parts = [self.dicom() for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        delimiter = b"--" + boundary.encode("utf-8")
        body = (
            b"".join(
                delimiter
                + b"\r\n"
                + rng.choice(
                    [
                        b"Content-Type: application/dicom\r\n",
                        b"",
                        b"Content-Type: text/plain\r\n",
                        b"X: " + b"a" * rng.choice([10, 20000]) + b"\r\n",
                    ]
                )  # fmt: skip
                + b"\r\n"
                + part
                + b"\r\n"
                for part in parts
            )
            + delimiter
            + b"--\r\n"
        )
        if rng.random() < 0.3:
            body = flip_bytes(rng, body) if rng.random() < 0.5 else body[: rng.randrange(0, len(body) + 1)]
        quoted = f'"{boundary}"' if rng.random() < 0.5 else boundary
        envelope = rng.choice(['multipart/related; type="application/dicom"; boundary={}',
                               "multipart/related; boundary={}", "multipart/form-data; boundary={}",
                               "multipart/related; start=x; boundary={}", "multipart/related"])  # fmt: skip
        content_type = envelope.format(quoted)
        return content_type, body

    def json_body(self, template: str) -> bytes:
        rng = self.rng
        if "bulkUpdate" in template:
            document = {
                "studyInstanceUids": [
                    self.uid(rng.choice(self.stored).study) for _ in range(rng.choice([0, 1, 2, 51]))
                ],
                "changeDataset": {rng.choice(UPDATABLE): self.element() for _ in range(rng.randint(0, 3))},
            }
        elif template.endswith("{tag_path}"):
            document = {rng.choice(["QueryStatus", "queryStatus", "Level", "x"]): rng.choice(
                ["Enabled", "disabled", None, 1, [], {}, self.text()])}  # fmt: skip
        else:
            document = [
                {key: rng.choice([self.text(), None, 5, [], "Study", "Series", "Instance", "LO", "PatientAge",
                                  "StationName", "00191001", "0040A30A"])  # fmt: skip
                 for key in rng.sample(["path", "vr", "level", "privateCreator", "x"], rng.randint(0, 5))}
                for _ in range(rng.randint(0, 3))
            ]  # fmt: skip
        if rng.random() < 0.2:
            document = random_json(rng, rng.randint(0, 5))
        body = json.dumps(document).encode()
        kind = rng.random()
        if kind < 0.05:
            return b"[" * rng.choice([100, 1000, 100000]) + b"]" * 10
        if kind < 0.1:
            return body.replace(b"1", b"NaN", 1).replace(b"null", b"1e999", 1)
        if kind < 0.2:
            return flip_bytes(rng, body)
        return body

    def element(self) -> object:
        rng = self.rng
        value = rng.choice([[{"Alphabetic": self.text()}], [self.text()], [rng.randint(-5, 10**6)], [1.5], [None], [],
                            "x", {"Alphabetic": "A"}, [[1]], [True]])  # fmt: skip
        element: dict = {"vr": rng.choice(VRS)}
        if rng.random() < 0.85:
            element["Value"] = value
        if rng.random() < 0.1:
            element[rng.choice(["InlineBinary", "BulkDataURI"])] = rng.choice(["AAAA", "http://x", 5])
        return element

    # -- the run -----------------------------------------------------------------------------------------------------
    def request(self, client: httpx.Client) -> None:
        rng = self.rng
        method, template = rng.choice(self.routes)
        if method == "DELETE" and rng.random() < 0.8:
            method = "GET"  # keep most of the stored data for the other requests
        if rng.random() < 0.02:
            method = rng.choice(["PUT", "PATCH", "OPTIONS", "HEAD", "POST", "DELETE"])
        path = self.path(template)
        query = self.query()
        url = f"{path}?{query}" if query else path
        headers = self.headers()
        content = None
        if method == "POST" and template.endswith(("/studies", "/studies/{study}")):
            content_type, content = self.stow_body()
            headers["Accept"] = rng.choice(["application/dicom+json"] * 4 + [headers.get("Accept", "")])
        elif method in ("POST", "PATCH"):
            content_type = rng.choice(["application/json"] * 8 + ["text/plain", "application/dicom+json", ""])
            content = self.json_body(template)
        else:
            content_type = ""
        if content_type and is_header_value(content_type):
            headers["Content-Type"] = content_type
        summary = f"{method} {url} headers={headers} body={len(content or b'')} bytes {(content or b'')[:80]!r}"
        try:
            encoded = {name: value.encode("latin-1") for name, value in headers.items()}
            response = client.request(method, url, headers=encoded, content=content)
        except (httpx.InvalidURL, httpx.LocalProtocolError):
            self.counts["not sendable"] += 1  # refused by the client itself (URL too long, illegal header)
            return
        except httpx.TransportError as exc:
            self.counts["dropped"] += 1
            self.failures.append(f"DROPPED ({type(exc).__name__}: {exc}): {summary}; previous: {self.previous}")
            return
        finally:
            self.previous = summary
        self.counts[response.status_code] += 1
        if response.status_code >= 500:
            self.failures.append(f"{response.status_code} {response.text[:200]!r}: {summary}")
        if method == "DELETE" and response.status_code == 204:
            self.store_again(client)

    def store_again(self, client: httpx.Client) -> None:
        for data in self.files:
            client.post(
                f"{self.prefix}/studies",
                content=data,
                headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"},
            )

    @property
    def prefix(self) -> str:
        return "/v2/partitions/Microsoft.Default" if self.partitions else "/v2"


# -- DICOM files -------------------------------------------------------------------------------------------------------
def make_file(rng: random.Random, study: str | None = None, depth: int = 0) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"FUZZ-{rng.randrange(10**6)}"
    ds.PatientName = rng.choice(["Test^Patient", "Ünïcode^Näme", "A" * 70])
    ds.StudyDate = rng.choice(["20240102", "2024", "20241301", ""])
    ds.Modality = "OT"
    rows, columns, frames = rng.choice([(4, 4, 1), (16, 16, 3), (1, 1, 1)])
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if depth:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.arange(rows * columns * frames, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    implicit = meta.TransferSyntaxUID == ImplicitVRLittleEndian
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    data = buffer.getvalue()
    if depth:  # written by hand: pydicom's writer recurses once per level
        at = data.rfind(b"\xe0\x7f\x10\x00")
        data = data[:at] + nested_sequences(depth) + data[at:]
    return data


def nested_sequences(depth: int) -> bytes:
    """Content Sequences (explicit VR little endian, undefined lengths), each the only item of the one above."""
    sequence, item = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff", b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end, sequence_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (sequence + item) * depth + (item_end + sequence_end) * depth


def damage_vr(rng: random.Random, data: bytes) -> bytes:
    """An explicit VR changed to another (or to garbage), or an element length made absurd."""
    out = bytearray(data)
    spots = [m.start() for m in re.finditer(rb"(?<=[\x00-\xff]{4})(PN|LO|DA|UI|CS|US|SQ|OB|OW|SH)", data[132:])]
    for at in rng.sample(spots, min(len(spots), rng.randint(1, 3))):
        at += 132
        if rng.random() < 0.6:
            out[at : at + 2] = rng.choice([b"SQ", b"OB", b"UN", b"US", b"FD", b"AT", b"xx", b"\x00\x00"])
        else:
            out[at + 2 : at + 4] = struct.pack("<H", rng.choice([0xFFFF, 0xFFFE, 1, 3]))
    return bytes(out)


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not out:
            break
        at = rng.randrange(len(out))
        out[at] = rng.randrange(256)
    return bytes(out)


def mutate_text(rng: random.Random, text: str) -> str:
    kind = rng.random()
    if kind < 0.25:
        return text + rng.choice(["\n", " ", "\x00", ".", "..", "%", "²", "٣", "é", "\r\n"])
    if kind < 0.5 and text:
        at = rng.randrange(len(text))
        return text[:at] + chr(rng.randrange(0, 0x2500)) + text[at + 1 :]
    if kind < 0.75:
        return text * rng.choice([2, 10, 100])
    return text[: rng.randrange(len(text) + 1)]


def random_json(rng: random.Random, depth: int) -> object:
    if depth <= 0 or rng.random() < 0.3:
        return rng.choice([None, True, 0, -1, 2**63, 1.5, "", "x", "1.2.3"])
    if rng.random() < 0.5:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "vr", "Value", "path", "studyInstanceUids", "changeDataset"]): random_json(rng, depth - 1)
            for _ in range(rng.randint(0, 3))}  # fmt: skip


def is_header_value(value: str) -> bool:
    """What an HTTP client can send at all: Latin-1 without control characters or surrounding space."""
    return value == value.strip() and all(32 <= ord(c) < 256 and c != "\x7f" for c in value)


# -- setup and report --------------------------------------------------------------------------------------------------
def routes_of(client: httpx.Client, partitions: bool) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").raise_for_status().json()
    routes = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    variants = [
        (method, path.replace("/v{version}/", "/v{version}/partitions/{partition_name}/", 1))
        for method, path in routes
        if path.startswith("/v{version}/") and path[len("/v{version}") :].startswith(STUDY_ROUTERS)
    ]
    # with partitions on, the plain Studies routes all answer 400 (and the partition routes without them): a few
    return (variants + routes[::5]) if partitions else (routes + variants[::10])


def seed_data(campaign: Campaign, client: httpx.Client) -> None:
    for _ in range(5):
        data = make_file(campaign.rng)
        campaign.files.append(data)
        response = client.post(
            f"{campaign.prefix}/studies",
            content=data,
            headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"},
        )
        response.raise_for_status()
        dataset = response.json()["00081199"]["Value"][0]
        url = dataset["00081190"]["Value"][0]
        study, series, sop = re.search(r"studies/([^/]+)/series/([^/]+)/instances/([^/]+)", url).groups()
        frames = int(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get("NumberOfFrames", 1))
        campaign.stored.append(Stored(study, series, sop, frames))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="root of a running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--requests", type=int, default=10000, help="stop after this many requests")
    parser.add_argument("--seconds", type=float, default=600, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # pydicom warns about the invalid values this script writes on purpose
    rng = random.Random(args.seed)
    with httpx.Client(base_url=args.url, timeout=120) as client:
        partitions = client.get("/v2/partitions").status_code == 200
        campaign = Campaign(args.url, rng, partitions, routes_of(client, partitions))
        seed_data(campaign, client)
        started = time.monotonic()
        sent = 0
        while sent < args.requests and time.monotonic() - started < args.seconds:
            campaign.request(client)
            sent += 1
            if sent % 1000 == 0:
                print(f"{sent} requests, {time.monotonic() - started:.0f} s: {dict(campaign.counts)}", flush=True)
        healthy = client.get("/health/check").status_code == 200
    elapsed = time.monotonic() - started
    print(f"\n{sent} requests in {elapsed:.0f} s against {args.url} (seed {args.seed}, partitions {partitions})")
    for status, number in sorted(campaign.counts.items(), key=lambda item: str(item[0])):
        print(f"  {status}: {number}")
    print(f"  healthy afterwards: {healthy}")
    for failure in campaign.failures:
        print(failure)
    return 1 if campaign.failures or not healthy else 0


if __name__ == "__main__":
    sys.exit(main())
