"""What a web viewer (OHIF) relies on, end to end through real servers on SQLite and PostgreSQL.

1. PS3.18's ``accept`` query parameter (8.3.3.1) overrides the Accept header on every retrieve route and on QIDO:
   OHIF's thumbnails send ``?accept=image/jpeg`` together with a multipart Accept header.
2. QIDO study and series rows carry their counts by default on v2 (PS3.18's default attribute sets), from counts the
   index keeps exact under concurrent stores, deletes, crash roll-backs, bulk updates and the migration that adds them.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from alembic import command
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from dicomhub.config import DEFAULT_PARTITION
from dicomhub.index.engine import alembic_config, make_engine
from dicomhub.index.repository import Index
from tests.factory import make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server, database_url
from tests.test_bulk_update import update

DICOM_JSON = {"Accept": "application/dicom+json"}
OHIF_IMAGE = {"Accept": 'multipart/related; type="image/jpeg"'}  # what OHIF's rendered/thumbnail requests carry
MULTIPLE_ACCEPT = "The request contains multiple accept headers, which is not supported."
SINGLE_FRAME_ONLY = "The accept header is supported for single frame retrieval, use multi-part accept header instead."
EXPLICIT = "1.2.840.10008.1.2.1"
ROWS = COLUMNS = 16


def store(client: httpx.Client, *datasets) -> httpx.Response:
    content_type, body = multipart([to_bytes(ds) for ds in datasets])
    return client.post("/v2/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})


def boundary_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related answer's parts."""
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    sections = response.content.split(b"--" + boundary)[1:-1]
    return [section.partition(b"\r\n\r\n")[2].removesuffix(b"\r\n") for section in sections]


@pytest.fixture(scope="module")
def image(server: Server):
    """A two-frame 16 x 16 instance with an overlay (a bulk value besides the pixel data) in a study of its own."""
    ds = make_dataset(frames=2, rows=ROWS, columns=COLUMNS)
    ds.add_new(0x60000010, "US", 64)
    ds.add_new(0x60000011, "US", 64)
    ds.add_new(0x60003000, "OW", bytes(range(256)) * 8)  # 2048 bytes: over the BulkDataURI threshold
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert store(client, ds).status_code == 200
    return ds


def instance_path(ds) -> str:
    return f"/v2/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def frame_bytes(ds, number: int) -> bytes:
    size = ROWS * COLUMNS * 2
    return ds.PixelData[(number - 1) * size : number * size]


# -- 1. the accept query parameter -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rendered", "thumbnail"])
def test_ohif_image_requests_get_jpeg_through_the_accept_parameter(http: httpx.Client, image, kind: str) -> None:
    study = f"/v2/studies/{image.StudyInstanceUID}"
    series = f"{study}/series/{image.SeriesInstanceUID}"
    for path in (study, series, instance_path(image), f"{instance_path(image)}/frames/2"):
        assert http.get(f"{path}/{kind}", headers=OHIF_IMAGE).status_code == 406  # the header alone is refused
        response = http.get(f"{path}/{kind}?accept=image/jpeg", headers=OHIF_IMAGE)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"] == "image/jpeg"
        assert response.content.startswith(b"\xff\xd8\xff")
        decoded = Image.open(io.BytesIO(response.content))
        assert (decoded.format, decoded.size) == ("JPEG", (COLUMNS, ROWS))


def test_accept_parameter_overrides_the_header_on_rendered(http: httpx.Client, image) -> None:
    path = f"{instance_path(image)}/rendered"
    png = http.get(path, params={"accept": "image/png"}, headers={"Accept": "image/jpeg"})
    assert (png.status_code, png.headers["content-type"]) == (200, "image/png")
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    # invalid values are answered as the same header would be
    several = http.get(path, params={"accept": "image/jpeg, image/png"}, headers={"Accept": "image/jpeg"})
    assert (several.status_code, several.text) == (406, MULTIPLE_ACCEPT)
    other = http.get(path, params={"accept": "text/html"}, headers={"Accept": "image/jpeg"})
    assert other.status_code == 406 and "'text/html' is not supported" in other.text


def test_accept_parameter_on_instance_study_and_series_retrieve(http: httpx.Client, image) -> None:
    sent = to_bytes(image)
    single = http.get(
        instance_path(image), params={"accept": "application/dicom; transfer-syntax=*"}, headers=DICOM_JSON
    )
    assert single.status_code == 200, single.text
    assert single.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    assert single.content == sent
    study = f"/v2/studies/{image.StudyInstanceUID}"
    # percent-encoded spaces and quotes, as a browser sends them
    multi = http.get(f"{study}?accept=multipart/related;%20type=%22application/dicom%22;%20transfer-syntax=*")
    assert multi.status_code == 200, multi.text
    assert boundary_parts(multi) == [sent]
    # a study is multipart only: single part asked through the parameter is the header's 406
    assert http.get(study, params={"accept": "application/dicom"}, headers={"Accept": "*/*"}).status_code == 406


def test_accept_parameter_on_metadata(http: httpx.Client, image) -> None:
    path = f"{instance_path(image)}/metadata"
    # a raw '+' is the plus of application/dicom+json (RFC 3986), not a form-encoded space
    response = http.get(f"{path}?accept=application/dicom+json", headers={"Accept": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.json()[0]["00080018"]["Value"] == [image.SOPInstanceUID]
    with_uris = http.get(path, params={"accept": "application/dicom+json; bulkdata=uri"}, headers={"Accept": "*/*"})
    assert with_uris.json()[0]["60003000"]["BulkDataURI"].endswith("/bulkdata/60003000")
    refused = http.get(path, params={"accept": "image/jpeg"}, headers=DICOM_JSON)
    assert (refused.status_code, refused.content) == (406, b"")


def test_accept_parameter_with_transfer_syntax_on_frames(http: httpx.Client, image) -> None:
    frames = f"{instance_path(image)}/frames"
    not_for_frames = {"Accept": "application/dicom"}
    assert http.get(f"{frames}/2", headers=not_for_frames).status_code == 406
    one = http.get(f"{frames}/2", params={"accept": f"application/octet-stream; transfer-syntax={EXPLICIT}"})
    assert one.status_code == 200, one.text
    assert one.headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT}"
    assert one.content == frame_bytes(image, 2)
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    both = http.get(f"{frames}/1,2", params={"accept": accept}, headers=not_for_frames)
    assert boundary_parts(both) == [frame_bytes(image, 1), frame_bytes(image, 2)]
    # a syntax the parameter names is produced: RLE, decoded back to the same pixels
    rle = http.get(f"{frames}/2", params={"accept": f"image/dicom-rle; transfer-syntax={RLELossless}"})
    assert rle.status_code == 200, rle.text
    assert rle.headers["content-type"] == f"image/dicom-rle; transfer-syntax={RLELossless}"
    check = make_dataset(rows=ROWS, columns=COLUMNS)
    check.file_meta.TransferSyntaxUID = RLELossless
    check.PixelData = encapsulate([rle.content])
    assert check.pixel_array.tobytes() == frame_bytes(image, 2)
    # invalid values: the header's answers
    lossy = http.get(
        f"{frames}/2", params={"accept": "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50"}
    )
    assert lossy.status_code == 406
    single = http.get(f"{frames}/1,2", params={"accept": "application/octet-stream"}, headers={"Accept": accept})
    assert (single.status_code, single.text) == (400, SINGLE_FRAME_ONLY)


def test_accept_parameter_on_bulkdata_and_pixeldata(http: httpx.Client, image) -> None:
    path = instance_path(image)
    assert http.get(f"{path}/pixeldata", headers={"Accept": "image/jpeg"}).status_code == 406
    pixels = http.get(
        f"{path}/pixeldata", params={"accept": "application/octet-stream"}, headers={"Accept": "image/jpeg"}
    )
    assert pixels.status_code == 200, pixels.text
    assert pixels.content == image.PixelData
    overlay = http.get(f"{path}/bulkdata/60003000?accept=application/octet-stream", headers={"Accept": "text/plain"})
    assert overlay.status_code == 200, overlay.text
    assert overlay.content == bytes(range(256)) * 8
    multi = http.get(
        f"{path}/bulkdata/60003000", params={"accept": 'multipart/related; type="application/octet-stream"'}
    )
    assert boundary_parts(multi) == [bytes(range(256)) * 8]


def test_accept_parameter_on_qido(http: httpx.Client, image) -> None:
    query = f"/v2/studies?StudyInstanceUID={image.StudyInstanceUID}"
    jpeg = {"Accept": "image/jpeg"}
    assert http.get(query, headers=jpeg).status_code == 406
    for accept in ("application/dicom+json", "application%2Fdicom%2Bjson", "image/png,application/dicom+json"):
        response = http.get(f"{query}&accept={accept}", headers=jpeg)
        assert response.status_code == 200, (accept, response.text)
        assert response.json()[0]["0020000D"]["Value"] == [image.StudyInstanceUID]
    # several parameters are one list; the parameter is no attribute filter
    repeated = http.get(f"{query}&accept=image/png&accept=application/dicom+json", headers=jpeg)
    assert repeated.status_code == 200
    series = http.get(
        f"/v2/studies/{image.StudyInstanceUID}/series", params={"accept": "application/json"}, headers=jpeg
    )
    assert series.json()[0]["0020000E"]["Value"] == [image.SeriesInstanceUID]
    refused = http.get(f"{query}&accept=image/jpeg", headers=DICOM_JSON)
    assert (refused.status_code, refused.content) == (406, b"")


# -- 2. counts ---------------------------------------------------------------------------------------------------------
def actual_counts(client: httpx.Client, study: str) -> Counter:
    """Series UID -> instances, from the study's metadata: the instances themselves."""
    response = client.get(f"/v2/studies/{study}/metadata", headers=DICOM_JSON)
    if response.status_code == 404:
        return Counter()
    assert response.status_code == 200, response.text
    return Counter(item["0020000E"]["Value"][0] for item in response.json())


def number(row: dict, tag: str) -> int:
    return row[tag]["Value"][0]


def search(client: httpx.Client, path: str, version: str, **params) -> list[dict]:
    response = client.get(f"/{version}{path}", params=params, headers=DICOM_JSON)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else []


def reported_counts(client: httpx.Client, study: str) -> Counter:
    """Series UID -> NumberOfSeriesRelatedInstances, after checking that the study row's counts agree with them; on
    v2 by default and on v1 through includefield, which must give the same numbers (one source for both)."""
    series_counts = []
    study_counts = []
    for version, include in (("v2", {}), ("v1", {"includefield": "00201206,00201208,00201209"})):
        rows = search(client, f"/studies/{study}/series", version, limit=200, **include)
        series_counts.append(Counter({r["0020000E"]["Value"][0]: number(r, "00201209") for r in rows}))
        rows = search(client, "/studies", version, StudyInstanceUID=study, **include)
        study_counts.append([(number(r, "00201206"), number(r, "00201208")) for r in rows])
    assert series_counts[0] == series_counts[1] and study_counts[0] == study_counts[1]
    series = series_counts[0]
    assert study_counts[0] == ([(len(series), sum(series.values()))] if series else [])
    return series


def assert_counts_exact(client: httpx.Client, study: str) -> Counter:
    actual = actual_counts(client, study)
    assert reported_counts(client, study) == actual
    return actual


def test_counts_stay_exact_under_concurrent_stores_of_one_study(server: Server, http: httpx.Client) -> None:
    """Six clients store into the same study at once, each creating and extending the same new series, and all send
    the same duplicates (one wins, the others fail): every stored instance is counted once."""
    study = new_uid()
    series = [new_uid() for _ in range(4)]
    duplicates = [make_dataset(study=study, series=series[3]) for _ in range(4)]
    start = threading.Barrier(6)

    def client(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            start.wait()
            for round_ in range(4):
                batch = [make_dataset(study=study, series=series[(n + round_ + i) % 4]) for i in range(3)]
                response = store(c, *batch, duplicates[round_])
                assert response.status_code in (200, 202), response.text

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(client, range(6)))
    counts = assert_counts_exact(http, study)
    assert sum(counts.values()) == 6 * 4 * 3 + 4 and len(counts) == 4


def test_counts_after_deleting_instances_and_series(http: httpx.Client) -> None:
    study = new_uid()
    a, b, c = new_uid(), new_uid(), new_uid()
    instances = {s: [make_dataset(study=study, series=s) for _ in range(n)] for s, n in ((a, 3), (b, 2), (c, 1))}
    assert store(http, *[ds for group in instances.values() for ds in group]).status_code == 200
    assert assert_counts_exact(http, study) == Counter({a: 3, b: 2, c: 1})
    assert http.delete(instance_path(instances[a][0])).status_code == 204
    assert assert_counts_exact(http, study) == Counter({a: 2, b: 2, c: 1})
    assert http.delete(f"/v2/studies/{study}/series/{b}").status_code == 204
    assert assert_counts_exact(http, study) == Counter({a: 2, c: 1})
    assert http.delete(instance_path(instances[c][0])).status_code == 204  # its last instance: the series goes
    assert assert_counts_exact(http, study) == Counter({a: 2})
    # a series stored again after its deletion is counted anew
    assert store(http, make_dataset(study=study, series=b)).status_code == 200
    assert assert_counts_exact(http, study) == Counter({a: 2, b: 1})
    assert http.delete(f"/v2/studies/{study}").status_code == 204
    assert assert_counts_exact(http, study) == Counter()


def test_counts_after_bulk_update(http: httpx.Client) -> None:
    study = new_uid()
    a, b = new_uid(), new_uid()
    datasets = [make_dataset(study=study, series=a) for _ in range(3)] + [make_dataset(study=study, series=b)]
    assert store(http, *datasets).status_code == 200
    results = update(http, [study], {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Counted^Again"}]}})
    assert results["instanceUpdated"] == 4
    assert assert_counts_exact(http, study) == Counter({a: 3, b: 1})
    assert http.delete(instance_path(datasets[0])).status_code == 204  # an updated instance, with its original
    assert assert_counts_exact(http, study) == Counter({a: 2, b: 1})
    assert store(http, make_dataset(study=study, series=b)).status_code == 200
    assert assert_counts_exact(http, study) == Counter({a: 2, b: 2})


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_unfinished_stores_are_not_counted_and_their_roll_back_keeps_counts(tmp_path, engine: str) -> None:
    """A crash between reserving an instance and committing it leaves a ``creating`` row: it is not counted, its
    roll-back (at start-up on SQLite, once stale on PostgreSQL) changes no count, and storing it later counts it."""
    db_url = database_url(engine)
    data_dir = tmp_path / "data"
    srv = Server(data_dir, db_url).start()
    study, series = new_uid(), new_uid()
    stored = [make_dataset(study=study, series=series) for _ in range(3)]
    orphans = [make_dataset(study=study, series=series), make_dataset(study=study)]  # one in a series of its own
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            assert store(client, *stored).status_code == 200
            index = Index(make_engine(srv.env().get("DICOMHUB_DATABASE_URL") or f"sqlite:///{data_dir / 'index.db'}"))
            partition = index.ensure_partition(DEFAULT_PARTITION)
            uids = [(study, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in orphans]
            reserved = index.begin_creates(partition.key, uids, datetime.now(UTC) - timedelta(hours=1))
            index.engine.dispose()
            assert all(isinstance(watermark, int) for watermark in reserved)
            assert assert_counts_exact(client, study) == Counter({series: 3})
    finally:
        srv.kill()  # SIGKILL: the reservations stay behind
    restarted = Server(data_dir, db_url, stale_create_seconds="1").start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            assert assert_counts_exact(client, study) == Counter({series: 3})
            response = store(client, *orphans)  # taken over once stale (PostgreSQL), or rolled back at start-up
            assert response.status_code == 200, response.text
            assert assert_counts_exact(client, study) == Counter({series: 4, orphans[1].SeriesInstanceUID: 1})
    finally:
        restarted.stop()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_migration_fills_the_counts_of_existing_data(tmp_path, engine: str) -> None:
    """Data stored before the counts existed: the migration adding them counts created instances only."""
    db_url = database_url(engine)
    data_dir = tmp_path / "data"
    srv = Server(data_dir, db_url).start()
    study, a, b = new_uid(), new_uid(), new_uid()
    url = srv.env().get("DICOMHUB_DATABASE_URL") or f"sqlite:///{data_dir / 'index.db'}"
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            datasets = [make_dataset(study=study, series=a) for _ in range(3)] + [make_dataset(study=study, series=b)]
            assert store(client, *datasets).status_code == 200
            assert client.delete(instance_path(datasets[0])).status_code == 204
            index = Index(make_engine(url))
            orphan = make_dataset(study=study, series=b)
            index.begin_creates(
                index.ensure_partition(DEFAULT_PARTITION).key,
                [(study, b, orphan.SOPInstanceUID)],
                datetime.now(UTC),
            )
            index.engine.dispose()
    finally:
        srv.stop()
    command.downgrade(alembic_config(url), "0007")
    migrated = Server(data_dir, db_url).start()  # serve migrates to the latest revision
    try:
        with httpx.Client(base_url=migrated.url, timeout=60) as client:
            assert assert_counts_exact(client, study) == Counter({a: 2, b: 1})
    finally:
        migrated.stop()


def test_each_study_row_of_a_page_has_its_own_counts(http: httpx.Client) -> None:
    pid = f"PID-{new_uid()[-12:]}"
    expected = {}
    for n_series, per_series, modality in ((1, 1, "CT"), (2, 3, "MR"), (3, 1, "US")):
        study = new_uid()
        datasets = [
            make_dataset(study=study, series=series, PatientID=pid, Modality=modality)
            for series in (new_uid() for _ in range(n_series))
            for _ in range(per_series)
        ]
        assert store(http, *datasets).status_code == 200
        expected[study] = (n_series, n_series * per_series, [modality])
    rows = search(http, "/studies", "v2", PatientID=pid)
    got = {
        r["0020000D"]["Value"][0]: (number(r, "00201206"), number(r, "00201208"), r["00080061"]["Value"]) for r in rows
    }
    assert got == expected
