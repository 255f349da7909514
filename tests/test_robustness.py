"""Bad input gets a 4xx with a message and never a 500; a crash (SIGKILL) never loses or half-stores an instance."""

from __future__ import annotations

import io
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomhub.config import DEFAULT_PARTITION
from dicomhub.index.engine import make_engine
from dicomhub.index.repository import Index
from tests.factory import make_dataset, make_instance, multipart, new_uid, to_bytes
from tests.servers import Server, database_url

ACCEPT = {"Accept": "application/dicom+json"}
SINGLE = {"Accept": "application/dicom+json", "Content-Type": "application/dicom"}
ANY_SYNTAX = {"Accept": "application/dicom; transfer-syntax=*"}
U = "1.2.3"  # a well-formed UID that is not stored
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
BAD_UIDS = ["abc", "1" * 65, "1.2.3a", "%ff", "x%00y", "1.2.3%20x", "-1", "1,2"]


def assert_client_error(response: httpx.Response, *statuses: int) -> None:
    """A 4xx (one of ``statuses`` when given) whose body is a non-empty text message naming the problem."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if statuses:
        assert response.status_code in statuses, (response.status_code, response.text)
    assert response.text.strip(), (
        f"{response.request.method} {response.request.url} gave an empty {response.status_code}"
    )
    assert response.headers["content-type"].startswith("text/plain")


# -- garbage query strings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("%ff%fe=1", "unknown query parameter"),
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=", "limit"),
        ("offset=-1", "offset"),
        ("offset=abc", "offset"),
        ("StudyDate=2020", "StudyDate"),
        ("StudyDate=20201301", "StudyDate"),
        ("StudyDate=-", "StudyDate"),
        ("StudyDate=%00", "StudyDate"),
        ("<script>alert(1)</script>", "invalid characters"),
        ("PatientName=%3Cscript%3E", "invalid characters"),
        ("unknownParameter=1", "unknownParameter"),
        ("includefield=NotAnAttribute", "includefield"),
        ("fuzzymatching=maybe", "fuzzymatching"),
        ("00100010=", "00100010"),
        ("Modality=CT", "Modality"),
        ("=x", "is not queryable"),
    ],
)
def test_garbage_query_strings_are_400(http, query, needle):
    response = http.get(f"/v2/studies?{query}", headers=ACCEPT)
    assert_client_error(response, 400)
    assert needle.lower() in response.text.lower()


@pytest.mark.parametrize(
    "resource", ["studies", "series", "instances", f"studies/{U}/series", f"studies/{U}/instances"]
)
def test_unknown_query_parameter_on_every_search_resource(http, resource):
    response = http.get(f"/v2/{resource}?NoSuchAttribute=1", headers=ACCEPT)
    assert_client_error(response, 400)
    assert "NoSuchAttribute" in response.text


@pytest.mark.parametrize(
    "query", ["PatientName=%ff%fe", "PatientID=" + "A" * 5000, "StudyDescription=%E2%9C%93%20caf%C3%A9"]
)
def test_odd_but_legal_query_values_search_without_error(http, query):
    response = http.get(f"/v2/studies?{query}", headers=ACCEPT)
    assert response.status_code in (200, 204), response.text


# -- garbage UIDs in every route ------------------------------------------------------------------------------------
def _routes(bad: str) -> list[tuple[str, str, str]]:
    """(method, path, the UID name the message must mention) for every Studies route, with ``bad`` in one slot."""
    routes = []
    for name, study, series, sop in (
        ("StudyInstanceUID", bad, U, U),
        ("SeriesInstanceUID", U, bad, U),
        ("SOPInstanceUID", U, U, bad),
    ):
        inst = f"/v2/studies/{study}/series/{series}/instances/{sop}"
        routes += [
            ("GET", f"{inst}", name),
            ("GET", f"{inst}/metadata", name),
            ("GET", f"{inst}/frames/1", name),
            ("DELETE", inst, name),
        ]
        if name != "SOPInstanceUID":
            routes += [
                ("GET", f"/v2/studies/{study}/series/{series}", name),
                ("GET", f"/v2/studies/{study}/series/{series}/metadata", name),
                ("GET", f"/v2/studies/{study}/series/{series}/instances", name),
                ("DELETE", f"/v2/studies/{study}/series/{series}", name),
            ]
        if name == "StudyInstanceUID":
            routes += [
                ("GET", f"/v2/studies/{study}", name),
                ("GET", f"/v2/studies/{study}/metadata", name),
                ("GET", f"/v2/studies/{study}/series", name),
                ("GET", f"/v2/studies/{study}/instances", name),
                ("DELETE", f"/v2/studies/{study}", name),
                ("POST", f"/v2/studies/{study}", name),
            ]
    return routes


@pytest.mark.parametrize("bad", BAD_UIDS)
def test_garbage_uids_in_every_route_are_400(http, bad):
    content_type, body = multipart([make_instance()])
    for method, path, name in _routes(bad):
        headers = {"Accept": "*/*"}
        content = None
        if method == "POST":
            headers = {**ACCEPT, "Content-Type": content_type}
            content = body
        response = http.request(method, path, headers=headers, content=content)
        assert_client_error(response, 400)
        assert name in response.text, (method, path, response.text)
        assert "invalid" in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/v3/studies",
        "/v0/studies",
        "/vabc/studies",
        "/v2.1/studies",
        "/studies",
        "/v3/studies/1.2.3/metadata",
        "/v3/series",
    ],
)
def test_unknown_versions_and_unversioned_routes_are_404(http, path):
    response = http.get(path, headers=ACCEPT)
    assert_client_error(response, 404)
    response = http.post(path, content=make_instance(), headers=SINGLE)
    assert 400 <= response.status_code < 500
    assert response.status_code != 500


def test_unknown_routes_and_methods_are_4xx(http):
    for method, path in [
        ("GET", "/v2/nothing-here"),
        ("PUT", "/v2/studies"),
        ("PATCH", f"/v2/studies/{U}"),
        ("DELETE", "/v2/studies"),
        ("GET", "/v2/studies/..%2f..%2fetc%2fpasswd/metadata"),
        ("POST", f"/v2/studies/{U}/series/{U}"),
    ]:
        response = http.request(method, path, headers=ACCEPT)
        assert_client_error(response)


def test_partition_route_without_partitions_is_400(http):
    response = http.get("/v2/partitions/foo/studies", headers=ACCEPT)
    assert_client_error(response, 400)
    assert response.text == "Data partitions feature is disabled."


# -- malformed STOW requests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ('multipart/related; type="application/dicom"; boundary=b0', b"", 400),
        ('multipart/related; type="application/dicom"; boundary=b0', b"--b0\r\n\r\n", 400),
        (
            'multipart/related; type="application/dicom"; boundary=b0',
            b"--b0\r\nContent-Type: application/dicom\r\n",
            400,
        ),
        (
            'multipart/related; type="application/dicom"; boundary=b0',
            b"--b0\r\n" + b"X: " + b"a" * 20000 + b"\r\n",
            400,
        ),
        ('multipart/related; type="application/dicom"; boundary=b0', b"--b0\r\n" + b"X-A: a\r\n" * 40 + b"\r\n", 400),
        ('multipart/related; type="application/dicom"; boundary=b0', b"\x00\xff" * 40000, 400),
        ('multipart/related; type="application/dicom"; boundary=""', b"--\r\n", 415),
        ('multipart/related; type="application/dicom"; boundary', b"--\r\n", 415),
        ("multipart/related", b"", 415),
        ("multipart/mixed; boundary=b0", b"--b0--", 415),
        ("multipart/form-data; boundary=b0", b"--b0--", 415),
        ("text/plain", b"hello", 415),
        ("application/dicom; q=1", b"", 415),
        ("garbage", b"", 415),
        (";;;", b"", 415),
    ],
)
def test_malformed_stow_requests_are_4xx_with_a_message(http, content_type, body, status):
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert_client_error(response, status)


BAD_BOUNDARY = "is invalid: it must be 1 to 200 printable ASCII characters"


@pytest.mark.parametrize(
    "boundary",
    [
        "b" * 201,
        "b" * 300,  # python-multipart refuses over 256 with an exception of its own: it was a 500
        '"unbalanced',
        '"ends with a space "',
        "back\\slash",
        "tab\there",
        "caf\xe9",
    ],
)
def test_invalid_multipart_boundaries_are_400(http, boundary):
    content_type, body = multipart([make_instance()], boundary="b0")
    header = f'multipart/related; type="application/dicom"; boundary={boundary}'.encode("latin-1")
    body = body.replace(b"--b0", b"--" + boundary.strip('"').encode("latin-1"))
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": header})
    assert_client_error(response, 400)
    assert BAD_BOUNDARY in response.text


def test_orthanc_boundary_of_two_uuids_stores(http):
    """Orthanc's DICOMweb plugin joins two UUIDs (73 characters: over RFC 2046's 70, accepted as Orthanc accepts it)."""
    boundary = "07a47eb9-5345-4bb4-92b0-354f1ffb4d22-07a47eb9-5345-4bb4-92b0-354f1ffb4d22"
    ds = make_dataset()
    content_type, body = multipart([to_bytes(ds)], boundary=boundary)
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert response.json()["00081199"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]


def test_longest_boundary_with_every_special_character_stores(http):
    boundary = "'()+_,-./:=? " + "x" * 186 + "?"
    assert len(boundary) == 200
    ds = make_dataset()
    content_type, body = multipart([to_bytes(ds)], boundary=boundary)
    response = http.post(
        "/v2/studies", content=body, headers={**ACCEPT, "Content-Type": f'{content_type[: -len(boundary)]}"{boundary}"'}
    )
    assert response.status_code == 200, response.text
    assert response.json()["00081199"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]


def test_multipart_shapes_without_headers_or_with_a_huge_header(http):
    """A part without any header is a DICOM part (the request's type); a 1 MB header line is refused, not buffered."""
    ds = make_dataset()
    content_type, body = multipart([to_bytes(ds)], part_type=None)
    response = http.post("/v2/studies", content=body, headers={**ACCEPT, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    huge = b"--b0\r\nX-Long: " + b"a" * (1 << 20) + b"\r\n\r\n" + make_instance() + b"\r\n--b0--\r\n"
    response = http.post(
        "/v2/studies", content=huge, headers={**ACCEPT, "Content-Type": "multipart/related; boundary=b0"}
    )
    assert_client_error(response, 400)
    assert response.text.startswith("The multipart request body is malformed")
    unclosed = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + make_instance()
    response = http.post(
        "/v2/studies", content=unclosed, headers={**ACCEPT, "Content-Type": "multipart/related; boundary=b0"}
    )
    assert_client_error(response, 400)
    assert response.text == "The multipart request body is malformed: it ends before the closing boundary."


# -- frame numbers and attribute names ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "frames",
    ["%C2%B2", "%E2%91%A0", "1,%D9%A3", "%EF%BC%91", "99999999999999999999", "2147483648", "0", "-1", "+1", "1_0"],
)
def test_frame_numbers_are_ascii_digits_within_32_bits(http, frames):
    """``str.isdigit`` takes '²' and '①' (which ``int`` refuses: it was a 500) and ``int`` takes '٣' (Arabic-Indic
    3): only ASCII digits are frame numbers, for frames and rendered alike."""
    ds = make_dataset(frames=3)
    assert http.post("/v2/studies", content=to_bytes(ds), headers=SINGLE).status_code == 200
    inst = f"/v2/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for path in (f"{inst}/frames/{frames}", f"{inst}/frames/{frames}/rendered"):
        response = http.get(path, headers={"Accept": "*/*"})
        assert_client_error(response, 400)
        assert "is not valid. Frame numbers are integers from 1 to 2147483647." in response.text
    assert http.get(f"{inst}/frames/3", headers={"Accept": "*/*"}).status_code == 200
    assert http.get(f"{inst}/frames/2147483647", headers={"Accept": "*/*"}).status_code == 404


def test_attribute_ids_with_a_trailing_line_feed_are_not_tags(http):
    """``^...$`` with ``match`` lets a final line feed through: '00100010\\n' was searched as PatientName."""
    response = http.get("/v2/studies", params={"00100010\n": "x"}, headers=ACCEPT)
    assert_client_error(response, 400)
    assert "00100010" in response.text


def test_garbage_dicom_in_stow_is_409_not_500(http):
    """Bodies that look like DICOM but break the parser in various places."""
    good = make_instance()
    variants = [
        good[:132],  # preamble and magic only
        good[:140],  # cut in the first meta element
        good[:132] + b"\xff" * 64,  # junk meta
        good[:300] + b"\xff\xff\xff\xff" + good[304:],  # corrupted element header
        bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff",  # meta element with an absurd length
        bytes(4096),
    ]
    for data in variants:
        response = http.post("/v2/studies", content=data, headers=SINGLE)
        assert response.status_code in (409, 200, 202), (response.status_code, response.text)
        if response.status_code == 409:
            codes = [i["00081197"]["Value"][0] for i in response.json()["00081198"]["Value"]]
            assert codes in ([43264], [45070]), codes


@pytest.mark.parametrize("multipart_body", [False, True])
def test_client_disconnect_mid_upload_leaves_nothing_behind(server, multipart_body):
    """A client that sends half a body and hangs up: no stored instance, no spooled file, no internal error."""
    ds = make_dataset(rows=256, columns=256)
    if multipart_body:
        content_type, body = multipart([to_bytes(ds)])
    else:
        content_type, body = "application/dicom", to_bytes(ds)
    head = (
        f"POST /v2/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/dicom+json\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    log_start = server.log_path.stat().st_size
    staging = server.data_dir / "blobs" / ".staging"
    before = set(staging.glob("*.part"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while set(staging.glob("*.part")) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(staging.glob("*.part")) - before, "the spooled half body is removed"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        found = client.get("/v2/instances", params={"SOPInstanceUID": ds.SOPInstanceUID}, headers=ACCEPT)
        assert found.status_code == 204
        assert client.post("/v2/studies", content=to_bytes(ds), headers=SINGLE).status_code == 200
    assert not set(staging.glob("*.part")) - before
    with open(server.log_path, "rb") as f:
        f.seek(log_start)
        log = f.read().decode("utf-8", "replace")
    assert "unhandled error" not in log
    assert '"status": 500' not in log


def _mutations(count: int) -> Iterator[tuple[str, bytes]]:
    """(version, damaged file): seeded random byte flips, overwrites, deletions and insertions after the preamble."""
    sources = [
        lambda: make_instance(SeriesDescription="fuzz", frames=2),
        lambda: make_instance(rows=8, columns=8, transfer_syntax="1.2.840.10008.1.2"),
        lambda: _reuid(Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes()),
        lambda: _reuid(Path(get_testdata_file("test-SR.dcm")).read_bytes()),
        lambda: _reuid(Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes()),
    ]
    for seed in range(count):
        rng = random.Random(seed)
        data = bytearray(sources[seed % len(sources)]())
        for _ in range(rng.randint(1, 6)):
            at, kind = rng.randrange(132, len(data)), rng.random()
            if kind < 0.5:
                data[at] = rng.randrange(256)
            elif kind < 0.7:
                data[at : at + 4] = rng.randbytes(4)
            elif kind < 0.85:
                del data[at : at + rng.randint(1, 50)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 20))
        yield ("v1" if seed % 2 else "v2"), bytes(data)


def _reuid(data: bytes) -> bytes:
    """The file with its three instance UIDs replaced by fresh UIDs of the same length."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    for uid in {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}:
        fresh = "1." + "".join(random.choices("123456789", k=len(uid) - 2))
        data = data.replace(uid.encode(), fresh.encode())
    return data


def test_fuzzed_dicom_files_never_cause_a_server_error(http):
    """Damaged files either fail with 43264 or are stored whole and served back (file and metadata), never a 5xx
    or a 272 (processing failure: an unexpected exception while storing)."""
    outcomes = {200: 0, 202: 0, 409: 0}
    for version, data in _mutations(60):
        response = http.post(f"/{version}/studies", content=data, headers=SINGLE)
        assert response.status_code in outcomes, (response.status_code, response.text)
        outcomes[response.status_code] += 1
        body = response.json()
        codes = [i["00081197"]["Value"][0] for i in body.get("00081198", {}).get("Value", [])]
        assert set(codes) <= {43264, 45070}, codes
        for item in body.get("00081199", {}).get("Value", []):
            url = item["00081190"]["Value"][0]
            fetched = http.get(url, headers=ANY_SYNTAX)
            assert fetched.status_code == 200
            assert fetched.content[128:] == data[128:]
            assert http.get(url + "/metadata", headers=ACCEPT).status_code == 200
    assert outcomes[409] and outcomes[200] + outcomes[202], outcomes


def test_server_is_healthy_after_the_garbage(http):
    assert http.get("/health/check").status_code == 200
    data = make_instance()
    assert http.post("/v2/studies", content=data, headers=SINGLE).status_code == 200


# -- crash safety ---------------------------------------------------------------------------------------------------
def _study_instances(client: httpx.Client, study: str) -> set[str]:
    """Every SOP Instance UID QIDO lists in the study (paged)."""
    found: set[str] = set()
    offset = 0
    while True:
        response = client.get(f"/v2/studies/{study}/instances", params={"limit": 200, "offset": offset}, headers=ACCEPT)
        assert response.status_code in (200, 204), response.text
        if response.status_code == 204:
            return found
        page = [r["00080018"]["Value"][0] for r in response.json()]
        found.update(page)
        if len(page) < 200:
            return found
        offset += 200


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_sigkill_during_stores_loses_nothing_acknowledged(tmp_path, engine):
    db_url = database_url(engine)
    data_dir = tmp_path / "data"
    server = Server(data_dir, db_url).start()
    study = new_uid()
    sent: dict[str, tuple[str, bytes]] = {}  # sop -> (series, bytes) of every store that was started
    acknowledged: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def load(seed: int) -> None:
        series = new_uid()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            n = 0
            while not stop.is_set():
                n += 1
                ds = make_dataset(study=study, series=series, rows=128, columns=256, InstanceNumber=n)
                ds.PixelData = os.urandom(len(ds.PixelData))  # distinct pixels per instance
                data = to_bytes(ds)
                with lock:
                    sent[ds.SOPInstanceUID] = (series, data)
                try:
                    response = client.post("/v2/studies", content=data, headers=SINGLE)
                except httpx.HTTPError:
                    return  # the server died under this request
                if response.status_code == 200:
                    with lock:
                        acknowledged.add(ds.SOPInstanceUID)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 24 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.kill()  # SIGKILL: no shutdown hooks, no rollback
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 10, "the load did not get going before the kill"

    # A crash exactly between reserving the UIDs and committing leaves a ``creating`` row: make sure there is one.
    orphan = make_dataset(study=study, rows=128, columns=256)
    index = Index(make_engine(server.env().get("DICOMHUB_DATABASE_URL") or f"sqlite:///{data_dir / 'index.db'}"))
    partition = index.ensure_partition(DEFAULT_PARTITION)
    index.begin_creates(
        partition.key,
        [(study, orphan.SeriesInstanceUID, orphan.SOPInstanceUID)],
        datetime.now(UTC) - timedelta(hours=1),
    )
    index.engine.dispose()
    sent[orphan.SOPInstanceUID] = (orphan.SeriesInstanceUID, to_bytes(orphan))

    # SQLite (one process) rolls unfinished stores back at start-up; on PostgreSQL other processes may be mid-store,
    # so a reservation is taken over once older than DICOMHUB_STALE_CREATE_SECONDS (1 s here, 600 s by default).
    restarted = Server(data_dir, db_url, stale_create_seconds="1").start()
    time.sleep(1.5)
    try:
        with httpx.Client(base_url=restarted.url, timeout=30) as client:
            visible = _study_instances(client, study)
            assert acknowledged <= visible, f"acknowledged but lost: {sorted(acknowledged - visible)}"
            assert visible <= set(sent), "an instance nobody sent is visible"
            for sop in visible:
                series, data = sent[sop]
                response = client.get(f"/v2/studies/{study}/series/{series}/instances/{sop}", headers=ANY_SYNTAX)
                assert response.status_code == 200, f"visible instance {sop} has no file: {response.text}"
                assert response.content == data
                assert (
                    pydicom.dcmread(io.BytesIO(response.content)).PixelData
                    == pydicom.dcmread(io.BytesIO(data)).PixelData
                )
            in_flight = set(sent) - visible
            assert orphan.SOPInstanceUID in in_flight
            for sop in in_flight:  # stores that never committed: the re-store must not be blocked
                series, data = sent[sop]
                response = client.post("/v2/studies", content=data, headers=SINGLE)
                assert response.status_code == 200, f"re-store of in-flight {sop}: {response.text}"
                fetched = client.get(f"/v2/studies/{study}/series/{series}/instances/{sop}", headers=ANY_SYNTAX)
                assert fetched.status_code == 200 and fetched.content == data
            for sop in list(acknowledged)[:5]:  # and committed ones are duplicates
                response = client.post("/v2/studies", content=sent[sop][1], headers=SINGLE)
                assert response.status_code == 409
                assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [45070]
            assert _study_instances(client, study) == set(sent)
    finally:
        restarted.stop()
    stray = list((data_dir / "blobs" / ".staging").glob("*.part"))
    assert len(stray) <= len(threads), "only requests cut by the kill may leave spooled parts"
