"""OHIF Viewer 3 in headless Chromium against a real dicomhub: the study list with its counts, and the viewer's series
thumbnails with OHIF's ``rendered`` and ``thumbnail`` strategies plus the main viewport's pixels.

OHIF is npm ``@ohif/app``'s prebuilt ``dist/`` (``tests/support/ohif/install.sh``), served from its own loopback origin
as a real deployment is, so every archive request is a cross-origin one (CORS). Chromium is Debian's, driven by
Playwright without any browser download. Locally the tests skip when Chromium, Playwright or OHIF is missing; under CI
they fail instead (``scripts/test.sh`` installs them).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from tests.factory import make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server
from tests.support.oidc.provider import admin_header_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

OHIF_DIST = Path(__file__).parent / "support" / "ohif" / "node_modules" / "@ohif" / "app" / "dist"
CHROMIUM = Path("/usr/bin/chromium")
# Root needs --no-sandbox; the others keep Chromium from calling outside hosts (the test machines have no internet).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]
PATIENT_NAME = "Viewer^Ohif"
SHOWN_PATIENT_NAME = "Viewer, Ohif"  # OHIF shows PN as "Family, Given"
CT_SLICES = 3
RGB_IMAGES = 2
WAIT_SECONDS = 30
THUMBNAIL_SELECTOR = '[data-cy="study-browser-thumbnail"]'
CANVAS_SELECTOR = '[data-cy="viewport-pane"] canvas.cornerstone-canvas'


def unavailable(reason: str) -> None:
    """Skips locally; fails under CI, where scripts/test.sh installs Chromium, Playwright and OHIF."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the OHIF tests (scripts/test.sh installs them)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install playwright; never `playwright install`)")
    if not CHROMIUM.is_file():
        unavailable(f"{CHROMIUM} is missing (apt-get install --no-install-recommends chromium)")
    if not (OHIF_DIST / "index.html").is_file():
        unavailable(f"OHIF is not installed in {OHIF_DIST} (bash tests/support/ohif/install.sh)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# -- the study --------------------------------------------------------------------------------------------------------
@dataclass
class Study:
    uid: str
    patient_id: str
    ct_series: str
    rgb_series: str


def ct_slice(study: str, series: str, patient_id: str, number: int) -> Dataset:
    """A 128x128 CT slice of 12 stored bits: air around a disc whose values ramp from -160 to 240 HU left to right,
    exactly the range of its window (40/400), so a rendering shows every gray level."""
    y, x = np.mgrid[0:128, 0:128]
    disc = (x - 64) ** 2 + (y - 64) ** 2 < 50**2
    pixels = np.where(disc, 864 + x * 400 // 128, 0).astype(np.uint16)
    ds = make_dataset(study=study, series=series, rows=128, columns=128, PatientID=patient_id, PatientName=PATIENT_NAME)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = -1024, 1, 40, 400
    ds.ImagePositionPatient = [0, 0, 2.0 * number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 2
    ds.PixelData = pixels.tobytes()
    return ds


def rgb_image(study: str, series: str, patient_id: str, number: int) -> Dataset:
    """A 64x64 Secondary Capture of three vertical bars: red, green, blue."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    for channel, columns in enumerate((slice(0, 21), slice(21, 42), slice(42, 64))):
        pixels[:, columns, channel] = 255
    ds = make_dataset(study=study, series=series, rows=64, columns=64, PatientID=patient_id, PatientName=PATIENT_NAME)
    ds.SeriesNumber, ds.InstanceNumber = 2, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture(scope="module")
def study(server: Server) -> Study:
    """One study of two series, stored through STOW: CT slices and RGB images, for a patient of its own."""
    stored = Study(new_uid(), f"OHIF-{uuid.uuid4().hex[:8]}", new_uid(), new_uid())
    datasets = [ct_slice(stored.uid, stored.ct_series, stored.patient_id, n) for n in range(1, CT_SLICES + 1)]
    datasets += [rgb_image(stored.uid, stored.rgb_series, stored.patient_id, n) for n in range(1, RGB_IMAGES + 1)]
    content_type, body = multipart([to_bytes(ds) for ds in datasets])
    response = httpx.post(f"{server.url}/v2/studies", content=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 200, response.text
    return stored


# -- OHIF, served as a site of its own ---------------------------------------------------------------------------------
def ohif_config(archive: str, thumbnail_rendering: str) -> dict:
    """OHIF's app config: one DICOMweb data source, the archive's v2 root, the given thumbnail strategy."""
    root = f"{archive}/v2"
    return {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomhub",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomhub",
                "configuration": {
                    "friendlyName": "dicomhub",
                    "name": "dicomhub",
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "wadoUriRoot": root,
                    "qidoSupportsIncludeField": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": thumbnail_rendering,
                    "enableStudyLazyLoad": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }


class OhifHandler(SimpleHTTPRequestHandler):
    """OHIF's dist/, the given app-config.js, and index.html for every other path (OHIF's client-side routes)."""

    def __init__(self, *args, config_js: bytes, **kwargs) -> None:
        self.config_js = config_js  # set first: the base class handles the request inside __init__
        super().__init__(*args, directory=str(OHIF_DIST), **kwargs)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            self.wfile.write(self.config_js)
            return
        if not Path(self.translate_path(self.path)).is_file():
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass


@contextmanager
def ohif_site(archive: str, thumbnail_rendering: str) -> Iterator[str]:
    config_js = f"window.config = {json.dumps(ohif_config(archive, thumbnail_rendering))};\n".encode()

    def handler(*args, **kwargs) -> OhifHandler:
        return OhifHandler(*args, config_js=config_js, **kwargs)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- a browser session that records what OHIF asked the archive ------------------------------------------------------
@dataclass
class Exchange:
    url: str
    accept: str
    status: int
    content_type: str

    @property
    def resource(self) -> str:
        """The last path segment: ``rendered``, ``thumbnail``, ``metadata``, ``1`` (a frame), ``series``, …"""
        return urlsplit(self.url).path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"GET {self.url} (Accept: {self.accept}) -> {self.status} {self.content_type}"


@dataclass
class Session:
    page: Page
    site: str
    archive: str
    exchanges: list[Exchange] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # failed requests, OHIF's own 4xx, error-boundary logs

    def record_response(self, response) -> None:
        if response.url.startswith(self.archive):
            accept, content_type = response.request.headers.get("accept", ""), response.headers.get("content-type", "")
            self.exchanges.append(Exchange(response.url, accept, response.status, content_type))
        elif response.url.startswith(self.site) and response.status >= 400:
            self.failures.append(f"OHIF file {response.url} -> {response.status}")

    def record_failure(self, request) -> None:
        if request.failure != "net::ERR_ABORTED":  # OHIF cancels loads it no longer needs
            self.failures.append(f"failed: {request.url} {request.failure}")

    def record_console(self, message) -> None:
        if "Error Boundary" in message.text:
            self.failures.append(f"console: {message.text[:300]}")

    def thumbnail_exchanges(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.resource in ("rendered", "thumbnail")]

    def archive_errors(self) -> list[str]:
        return [str(e) for e in self.exchanges if e.status >= 400]

    def wait_until(self, condition: Callable[[], bool], seconds: float = WAIT_SECONDS) -> bool:
        """Polls ``condition`` while the page runs (the sync API handles browser events only while it waits)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return True
            self.page.wait_for_timeout(250)
        return condition()

    def error_toasts(self) -> list[str]:
        return self.page.locator('[data-sonner-toast][data-type="error"]').all_inner_texts()

    def assert_clean(self) -> None:
        """No archive answer >= 400, no failed request, no OHIF error boundary, no error toast."""
        assert not self.archive_errors(), "\n".join(self.archive_errors())
        assert not self.failures, "\n".join(self.failures)
        assert not self.error_toasts(), self.error_toasts()


@contextmanager
def ohif_session(browser: Browser, archive: str, thumbnail_rendering: str) -> Iterator[Session]:
    with ohif_site(archive, thumbnail_rendering) as site:
        token = admin_header_for(archive)  # auth mode: the viewer logged in as an administrator would send it
        context = browser.new_context(
            viewport={"width": 1280, "height": 800}, extra_http_headers={"Authorization": token} if token else None
        )
        # OHIF's first-visit tour of the viewer would cover the viewport.
        context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        page = context.new_page()
        session = Session(page, site, archive)
        page.on("response", session.record_response)
        page.on("console", session.record_console)
        page.on("requestfailed", session.record_failure)
        try:
            yield session
        finally:
            context.close()


# -- what the page shows ----------------------------------------------------------------------------------------------
TABLE_ROWS_JS = """() => [...document.querySelectorAll('tbody tr')]
    .map(tr => [...tr.querySelectorAll('td')].map(td => td.innerText.trim()))"""

# Each thumbnail's series number, image width (0 until loaded) and the standard deviation of its R, G and B values.
THUMBNAILS_JS = f"""() => [...document.querySelectorAll('{THUMBNAIL_SELECTOR}')].map(card => {{
    const img = card.querySelector('img');
    if (!img || !img.complete || !img.naturalWidth) return {{series: card.dataset.series, width: 0, std: 0}};
    const canvas = document.createElement('canvas');
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const d = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0, squares = 0;
    for (let i = 0; i < d.length; i++) if (i % 4 !== 3) {{ sum += d[i]; squares += d[i] * d[i]; }}
    const n = d.length * 3 / 4, mean = sum / n;
    return {{series: card.dataset.series, width: img.naturalWidth, std: Math.sqrt(squares / n - mean * mean)}};
}})"""

# Colour statistics of the main viewport's canvas (the 2D canvas Cornerstone draws each rendered image into).
CANVAS_JS = f"""() => {{
    const canvas = document.querySelector('{CANVAS_SELECTOR}');
    if (!canvas || !canvas.width) return null;
    const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const grays = new Set();
    let sum = 0, squares = 0, colored = 0, red = 0, green = 0, blue = 0;
    for (let i = 0; i < d.length; i += 4) {{
        const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
        const v = (r + g + b) / 3;
        sum += v; squares += v * v;
        if (r === g && g === b) grays.add(r); else colored++;
        if (r > 200 && g < 60 && b < 60) red++;
        if (g > 200 && r < 60 && b < 60) green++;
        if (b > 200 && r < 60 && g < 60) blue++;
    }}
    const n = d.length / 4, mean = sum / n;
    return {{pixels: n, std: Math.sqrt(squares / n - mean * mean), grayLevels: grays.size,
             colored: colored / n, red: red / n, green: green / n, blue: blue / n}};
}}"""


def study_list_rows(session: Session) -> list[list[str]]:
    return session.page.evaluate(TABLE_ROWS_JS)


def canvas_stats(session: Session) -> dict | None:
    return session.page.evaluate(CANVAS_JS)


# -- tests ------------------------------------------------------------------------------------------------------------
def test_study_list_shows_the_patient_and_counts(browser, server, study, tmp_path):
    """The work list row (patient, modalities, instances) and its series preview (instances per series) come from QIDO's
    default attributes: OHIF does not name the counts in includefield."""
    with ohif_session(browser, server.url, "thumbnail") as session:
        session.page.goto(f"{session.site}/?mrn={study.patient_id}")
        session.page.get_by_text(SHOWN_PATIENT_NAME).first.wait_for(timeout=WAIT_SECONDS * 1000)
        rows = [row for row in study_list_rows(session) if row and row[0] == SHOWN_PATIENT_NAME]
        assert len(rows) == 1, rows
        _patient, _date, modalities, _description, instances = rows[0][:5]
        assert instances == str(CT_SLICES + RGB_IMAGES), rows[0]  # "0" without NumberOfStudyRelatedInstances
        assert "CT" in modalities and "OT" in modalities, rows[0]  # both only with ModalitiesInStudy

        session.page.get_by_text(SHOWN_PATIENT_NAME).first.click()  # opens the series preview
        expected = [["CT", str(CT_SLICES)], ["OT", str(RGB_IMAGES)]]

        def preview() -> list[list[str]]:
            return sorted(row for row in study_list_rows(session) if len(row) == 2 and row[0] in ("CT", "OT"))

        session.wait_until(lambda: preview() == expected or any("NaN" in row for row in preview()), 10)
        session.page.screenshot(path=tmp_path / "study-list.png")
        assert preview() == expected  # "NaN" without NumberOfSeriesRelatedInstances
        session.assert_clean()


@pytest.mark.parametrize("strategy", ["rendered", "thumbnail"])
def test_viewer_thumbnails_and_images(browser, server, study, strategy, tmp_path):
    """Every series thumbnail in the left panel is a JPEG the archive rendered (OHIF asks for it with ``?accept=image/
    jpeg`` and a multipart Accept header), and the viewport shows the CT slice, then the RGB image."""
    with ohif_session(browser, server.url, strategy) as session:
        session.page.goto(f"{session.site}/viewer?StudyInstanceUIDs={study.uid}")

        def thumbnails_loaded() -> bool:
            cards = session.page.evaluate(THUMBNAILS_JS)
            return len(cards) == 2 and all(card["width"] > 0 for card in cards)

        def thumbnail_refused() -> bool:
            return any(e.status != 200 for e in session.thumbnail_exchanges())

        session.wait_until(lambda: thumbnails_loaded() or thumbnail_refused())
        session.page.screenshot(path=tmp_path / f"viewer-{strategy}.png")
        exchanges = session.thumbnail_exchanges()
        report = "\n".join(str(e) for e in exchanges) or "no thumbnail requests"
        assert all(e.status == 200 and e.content_type.startswith("image/jpeg") for e in exchanges), report
        for series in (study.ct_series, study.rgb_series):
            assert any(f"/series/{series}/" in e.url and e.resource == strategy for e in exchanges), report
        cards = session.page.evaluate(THUMBNAILS_JS)
        assert sorted(card["series"] for card in cards) == ["1", "2"], cards
        assert all(card["width"] > 0 and card["std"] > 20 for card in cards), cards  # loaded, and not blank

        # The CT slice: the window's whole gray ramp on black air, no colour.
        def shows_gray_ramp() -> bool:
            return (canvas_stats(session) or {}).get("grayLevels", 0) >= 64

        assert session.wait_until(shows_gray_ramp), canvas_stats(session)
        ct = canvas_stats(session)
        assert ct["colored"] == 0 and ct["std"] > 30, ct
        session.page.locator(CANVAS_SELECTOR).screenshot(path=tmp_path / f"viewport-ct-{strategy}.png")

        # The RGB series, opened from its thumbnail: three saturated bars.
        session.page.locator(f'{THUMBNAIL_SELECTOR}[data-series="2"]').dblclick()

        def shows_bars() -> bool:
            stats = canvas_stats(session) or {}
            return all(stats.get(colour, 0) > 0.1 for colour in ("red", "green", "blue"))

        assert session.wait_until(shows_bars), canvas_stats(session)
        session.page.locator(CANVAS_SELECTOR).screenshot(path=tmp_path / f"viewport-rgb-{strategy}.png")
        session.assert_clean()
