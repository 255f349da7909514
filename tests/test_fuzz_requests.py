"""Bounded property-based fuzzing of the request side: multipart bodies (in process and through STOW), QIDO
parameters, the JSON bodies of extended query tags and bulk update, frame lists and path segments.

Every answer must be below 500, a 4xx must carry a plain-text message (except the DICOM JSON datasets of STOW and
bulk update failures, spec 5.14), and the server must stay healthy. The example counts keep the module to about a
minute per engine; under CI the examples are derandomized, so a run cannot flake (``scripts/fuzz.py`` is the long,
stand-alone campaign).
"""

from __future__ import annotations

import asyncio
import json
import os
import string
from collections.abc import AsyncIterator, Iterator
from itertools import count
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dicomhub.api.errors import status_of
from dicomhub.api.media import MultipartSpooler, stow_boundary
from dicomhub.domain.bulk_update import UPDATABLE_KEYWORDS
from dicomhub.domain.errors import DicomHubError
from tests.conftest import ENGINES, start_server
from tests.factory import make_dataset, make_instance, new_uid, to_bytes
from tests.servers import Server

PARTITION = "/v2/partitions/Microsoft.Default"
DICOM_JSON = {"Accept": "application/dicom+json"}
# JSON answers to client errors that Azure gives as datasets: STOW failures (409) and bulk-update validation (400)
DATASET_ANSWERS = {("POST", "stow"): (409,), ("POST", "bulk"): (400,)}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=bool(os.environ.get("CI")),
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", params=ENGINES)
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of this module's own (extended query tags are global), partitions on so that the partition routes
    are fuzzed too; a three-frame instance is stored so that queries and frame routes find something."""
    srv = start_server(tmp_path_factory, request.param, enable_partitions="true", operation_poll_seconds="0.1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stored(fuzzed: Server) -> tuple[str, str, str]:
    ds = make_dataset(frames=3, PatientName="Fuzz^Target", AccessionNumber="A1")
    response = httpx.post(
        f"{fuzzed.url}{PARTITION}/studies",
        content=to_bytes(ds),
        headers={"Content-Type": "application/dicom", **DICOM_JSON},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


@pytest.fixture
def client(fuzzed: Server) -> Iterator[httpx.Client]:
    """A client for one test; the server must answer its health check when the test is over."""
    with httpx.Client(base_url=fuzzed.url, timeout=60) as http:
        yield http
        assert http.get("/health/check").status_code == 200


def check(response: httpx.Response, kind: str = "") -> None:
    """Below 500; a client error names its problem in plain text (or is one of Azure's DICOM JSON datasets)."""
    request = response.request
    assert response.status_code < 500, (request.method, str(request.url), response.status_code, response.text)
    if response.status_code < 400 or response.status_code in (404, 406) and not response.content:
        return  # Azure's Accept filter answers 406 with no body; FastAPI's unknown routes are 404s
    dataset = response.headers.get("content-type", "").startswith(("application/json", "application/dicom+json"))
    if dataset and response.status_code in DATASET_ANSWERS.get((request.method, kind), ()):
        return
    assert response.headers["content-type"].startswith("text/plain"), (str(request.url), response.headers)
    assert response.text.strip(), (request.method, str(request.url), response.status_code)


# -- (a) multipart -----------------------------------------------------------------------------------------------------
BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=? \"\\\t;é"
HEADER_NAMES = st.sampled_from(["Content-Type", "content-type", "Content-Length", "Content-Location", "X-Other", ""])
HEADER_VALUES = st.one_of(
    st.sampled_from(["application/dicom", "application/dicom; transfer-syntax=1.2.840.10008.1.2.1", "text/plain", ""]),
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255, exclude_characters="\r\n"), max_size=40),
)


@st.composite
def multipart_requests(draw: st.DrawFn, dicom: bool = False) -> tuple[str, bytes, list[bytes], bool]:
    """(Content-Type, body, payloads, whether the body is well formed): well-formed bodies with any boundary,
    headers and payloads, or one of them damaged in a way a client could send."""
    boundary = draw(st.one_of(st.just("b0"), st.text(alphabet=BOUNDARY_CHARS, min_size=0, max_size=300)))
    quoted = draw(st.booleans())
    content_type = draw(
        st.sampled_from(
            [
                'multipart/related; type="application/dicom"; boundary={}',
                "multipart/related; boundary={}",
                "Multipart/Related; Type=application/dicom; Boundary={}",
                'multipart/related; type="application/dicom+xml"; boundary={}',
                "multipart/related; start=x; boundary={}",
            ]
        )
    ).format(f'"{boundary}"' if quoted else boundary)
    payload = st.binary(max_size=300)
    if dicom:
        payload = st.one_of(payload, st.builds(lambda: make_instance(rows=4, columns=4)))
    headers = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3)
    parts = draw(st.lists(st.tuples(headers, payload), max_size=3))
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    assume(not any(b"\r\n" + delimiter in b"\r\n" + data for _, data in parts))
    pieces = [draw(st.sampled_from([b"", b"preamble\r\n"]))]
    for fields, data in parts:
        head = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in fields)
        pieces.append(delimiter + b"\r\n" + head + b"\r\n" + data + b"\r\n")
    pieces.append(delimiter + b"--\r\n")
    body = b"".join(pieces)
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert", "no-final-crlf"]))
    if damage == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif damage == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif damage == "insert":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([delimiter, b"\r\n", b"--", b"\r\n\r\n", b"x" * 20000])) + body[at:]
    elif damage == "no-final-crlf":
        body = body[:-2]
    return content_type, body, [data for _, data in parts], damage in ("none", "no-final-crlf")


async def _chunks(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in sorted(cuts):
        yield body[start:cut]
        start = cut
    yield body[start:]


@fuzz_settings(300)
@given(request=multipart_requests(), cuts=st.lists(st.integers(0, 5000), max_size=4))
def test_multipart_reader_in_process(request, cuts, tmp_path: Path) -> None:
    """Any body, cut into any chunks: a 4xx domain error, or exactly the parts that were sent."""
    content_type, body, payloads, well_formed = request
    spool = count()
    try:
        boundary = stow_boundary(content_type)
        assert boundary is not None
        spooler = MultipartSpooler(boundary, lambda: tmp_path / f"{next(spool)}.part", max_part_size=1 << 20)
        parts = asyncio.run(spooler.consume(_chunks(body, [c for c in cuts if c < len(body)])))
    except DicomHubError as error:
        assert 400 <= status_of(error) < 500 and error.message, error
        return
    if well_formed:
        assert [bytes(p.staged.data) for p in parts] == payloads


@fuzz_settings(40)
@given(request=multipart_requests(dicom=True))
def test_stow_with_generated_multipart_bodies(client: httpx.Client, request) -> None:
    content_type, body, _, _ = request
    headers = {"Content-Type": content_type.encode("latin-1", "replace").strip(), **DICOM_JSON}  # as HTTP allows
    for path in ("/v2/studies", f"{PARTITION}/studies", f"{PARTITION}/studies/{new_uid()}"):
        check(client.post(path, content=body, headers=headers), "stow")


# -- (b) QIDO parameters -----------------------------------------------------------------------------------------------
QUERY_KEYS = [
    "PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
    "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
    "ModalitiesInStudy", "PerformedProcedureStepStartDate", "ManufacturerModelName", "SOPClassUID", "00100010",
    "0020000D", "00080020", "0020000e", "includefield", "limit", "offset", "fuzzymatching", "accept", "StationName",
]  # fmt: skip
QUERY_VALUES = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789-*?,\\.^= ", max_size=30),
    st.sampled_from(
        [
            "",
            "*",
            "?",
            "all",
            "true",
            "false",
            "-1",
            "0",
            "201",
            "99999999999999999999",
            "1.2.3,1.2.4",
            "1.2.3\\1.2.4",
            "20240101-20240102",
            "-20240101",
            "20240101-",
            "2024",
            "20241301",
            "120000-",
            "Fuzz*",
            "fuzz tar",
            "PatientName,StudyDate",
            "NumberOfStudyRelatedInstances",
            "\x00",
            "%00",
            "A" * 5000,
            "٢٠٢٤٠١٠١",
            "１",
        ]
    ),  # fmt: skip
)


@fuzz_settings(150)
@given(
    resource=st.sampled_from(
        ["studies", "series", "instances", "{study}/series", "{study}/instances", "{study}/series/{series}/instances"]
    ),  # fmt: skip
    params=st.lists(st.tuples(st.one_of(st.sampled_from(QUERY_KEYS), st.text(max_size=12)), QUERY_VALUES), max_size=4),
    raw=st.one_of(st.just(""), st.binary(max_size=12).map(lambda b: "&" + quote(b) + "=" + quote(b[::-1]))),
    prefix=st.sampled_from(["/v1/partitions/Microsoft.Default", PARTITION]),
)
def test_qido_with_generated_parameters(client: httpx.Client, stored, resource, params, raw, prefix) -> None:
    study, series, _ = stored
    path = resource.format(study=f"studies/{study}", series=series)
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params) + raw
    check(client.get(f"{prefix}/{path}?{query}", headers=DICOM_JSON))


# -- (c) JSON bodies ---------------------------------------------------------------------------------------------------
JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
ANY_JSON = st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
VRS = ["PN", "LO", "SH", "CS", "DA", "TM", "DT", "AS", "DS", "IS", "LT", "UI", "SQ", "OB", "US", "FD", "XX", ""]
TAG_KEYS = st.one_of(
    st.sampled_from(["00100010", "00100020", "00101010", "00100030", "00101020", "00080060", "0010ffff", "+0100010"]),
    st.sampled_from(UPDATABLE_KEYWORDS),
    st.text(max_size=10),
)
ELEMENT = st.fixed_dictionaries(
    {"vr": st.sampled_from(VRS)},
    optional={
        "Value": st.one_of(st.lists(JSON_LEAVES | st.dictionaries(st.sampled_from(["Alphabetic", "x"]), JSON_LEAVES),
                                    max_size=3), JSON_LEAVES),
        "InlineBinary": st.text(alphabet="AQ=+/", max_size=8),
        "BulkDataURI": st.text(max_size=8),
    },
)  # fmt: skip
BULK_BODIES = st.one_of(
    ANY_JSON,
    st.fixed_dictionaries(
        {
            "studyInstanceUids": st.one_of(
                st.lists(st.one_of(st.builds(new_uid), st.text(max_size=70)), max_size=3), ANY_JSON
            ),
            "changeDataset": st.one_of(st.dictionaries(TAG_KEYS, st.one_of(ELEMENT, ANY_JSON), max_size=3), ANY_JSON),
        }
    ),  # fmt: skip
)
TAG_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "path": st.one_of(st.sampled_from(["StationName", "00191001", "PatientAge", "0040A30A", "x.y", "00100010"]),
                          st.text(max_size=12), JSON_LEAVES),
        "vr": st.one_of(st.sampled_from(VRS), JSON_LEAVES),
        "level": st.one_of(st.sampled_from(["Study", "series", "INSTANCE", "patient"]), JSON_LEAVES),
        "privateCreator": st.one_of(st.text(max_size=70), JSON_LEAVES),
    },
)  # fmt: skip
TAG_BODIES = st.one_of(ANY_JSON, st.lists(st.one_of(TAG_ENTRY, ANY_JSON), max_size=3))


def encoded(document, mutation: int) -> bytes:
    """The document as JSON, or damaged: cut short, nested deep, or with a byte changed."""
    body = json.dumps(document).encode()
    if mutation == 1:
        return body[: len(body) // 2]
    if mutation == 2:
        return b"[" * 3000 + body + b"]" * 3000
    if mutation == 3 and body:
        return body[:-1] + b"\xff"
    return body


@fuzz_settings(100)
@given(body=BULK_BODIES, mutation=st.integers(0, 6), prefix=st.sampled_from(["/v2", PARTITION]))
def test_bulk_update_with_generated_json(client: httpx.Client, body, mutation, prefix) -> None:
    content = encoded(body, mutation)
    check(client.post(f"{prefix}/studies/$bulkUpdate", content=content, headers={"Content-Type": "application/json"}),
          "bulk")  # fmt: skip


@fuzz_settings(100)
@given(body=TAG_BODIES, patch=ANY_JSON | st.fixed_dictionaries({"QueryStatus": JSON_LEAVES}),
       mutation=st.integers(0, 6), path=st.sampled_from(["StationName", "00191001", "Nope", "00100010"]))  # fmt: skip
def test_extended_query_tags_with_generated_json(client: httpx.Client, body, patch, mutation, path) -> None:
    headers = {"Content-Type": "application/json"}
    check(client.post("/v2/extendedquerytags", content=encoded(body, mutation), headers=headers))
    check(client.patch(f"/v1/extendedquerytags/{path}", content=encoded(patch, mutation), headers=headers))


# -- (d) frame lists and path segments ---------------------------------------------------------------------------------
FRAME_TEXT = st.one_of(
    st.text(alphabet="0123456789,-+ ²①٣１_.e", max_size=12),
    st.lists(st.integers(-3, 2**40), min_size=1, max_size=4).map(lambda n: ",".join(map(str, n))),
    st.text(max_size=8),
)
SEGMENTS = st.one_of(
    st.text(max_size=70),
    st.text(alphabet="0123456789. \x00\n", max_size=70),
    st.sampled_from(["", ".", "..", "1.2.3", "1" * 65, "Microsoft.Default", "a\n", "%", "1.2.3 ", "-"]),
)


@fuzz_settings(120)
@given(frames=FRAME_TEXT, accept=st.sampled_from(["*/*", "application/octet-stream", "image/png", "image/jpeg"]))
def test_frame_lists(client: httpx.Client, stored, frames, accept) -> None:
    study, series, sop = stored
    base = f"{PARTITION}/studies/{study}/series/{series}/instances/{sop}/frames/{quote(frames, safe='')}"
    for path in (base, base + "/rendered", base + "/thumbnail"):
        check(client.get(path, headers={"Accept": accept}))


@fuzz_settings(120)
@given(
    segment=SEGMENTS,
    slot=st.integers(0, 3),
    suffix=st.sampled_from(
        ["", "/metadata", "/rendered", "/thumbnail", "/frames/1", "/bulkdata/7FE00010", "/pixeldata"]
    ),
    method=st.sampled_from(["GET", "GET", "DELETE"]),
)
def test_path_segments(client: httpx.Client, stored, segment, slot, suffix, method) -> None:
    """Any text in a UID or partition slot of any scoped route (the stored UIDs elsewhere)."""
    names = [quote(value, safe="") for value in ("Microsoft.Default", *stored)]
    names[slot] = quote(segment, safe="") or "%20"
    path = f"/v2/partitions/{names[0]}/studies/{names[1]}/series/{names[2]}/instances/{names[3]}"
    if method == "DELETE" and slot == 1:  # an unknown study: the stored instance stays for the other examples
        check(client.delete(path))
    else:
        check(client.get(path + suffix, headers={"Accept": "*/*"}))
