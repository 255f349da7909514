"""Rendered resources and thumbnails: the display pipeline (modality LUT, windows, MONOCHROME1, colour), frames,
viewports, formats, Accept rules, documents and video, study/series representatives, the thumbnail cache, and every
error answer. Expected pixel values are computed here from the PS3.3 formulas, not by the code under test.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_color_lut
from pydicom.uid import JPEGBaseline8Bit

from tests.conftest import start_server
from tests.factory import WITHOUT_IMAGE, make_dataset, new_uid
from tests.servers import Server
from tests.test_wado import Stored, pydicom_file, reuid, store, stored

RENDER_FAILED = "An error was encountered when attempting to convert the dicom file into an image"
BAD_QUALITY = "Image quality must be between 1 and 100 inclusive"
MULTIPLE_ACCEPT = "The request contains multiple accept headers, which is not supported."
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
CDA_CLASS = "1.2.840.10008.5.1.4.1.1.104.2"
MPEG4 = "1.2.840.10008.1.2.4.102"
PDF_BYTES = (
    b"%PDF-1.4\n"
    + b"% filler line\n" * 700
    + b"1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"  # odd: padded when stored
)
CDA_BYTES = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><title>Report</title></ClinicalDocument>'
VIDEO_BYTES = bytes(range(256)) * 12  # 3072 bytes: three even fragments of 1024

# CT-like stored values (signed 16 bit); with slope 1 / intercept -1024 they cover air to bone and both ends.
CT_VALUES = np.array(
    [[-32768, 0, 524, 824, 1000, 1044, 1064, 1084, 1244, 1424, 1500, 2000, 4000, 32767, 1023, 1025]], dtype=np.int16
).repeat(8, axis=0)


# -- datasets ------------------------------------------------------------------------------------------------------
def image(pixels: np.ndarray, study: str | None = None, series: str | None = None, **attributes) -> Stored:
    """A native-syntax instance holding ``pixels`` exactly: (rows, cols) gray, (rows, cols, 3) RGB or
    (frames, rows, cols) multi-frame gray; dtype gives bits and signedness."""
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not rgb else 1
    rows, columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    bits = pixels.dtype.itemsize * 8
    ds = make_dataset(study=study, series=series, rows=rows, columns=columns, frames=frames)
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return stored(ds)


def document(sop_class: str, content: bytes, mime: str) -> Stored:
    ds = make_dataset(
        **WITHOUT_IMAGE,
        Modality="DOC",
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.MIMETypeOfEncapsulatedDocument = mime
    ds.EncapsulatedDocument = content
    ds.EncapsulatedDocumentLength = len(content)
    return stored(ds)


def video() -> Stored:
    ds = make_dataset(rows=32, columns=32, frames=25, transfer_syntax=MPEG4)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate([VIDEO_BYTES], fragments_per_frame=3)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return stored(ds)


def corrupt_second_frame() -> Stored:
    """examples_ybr_color.dcm (30 JPEG frames) with frame 2 replaced by bytes no decoder accepts."""
    ds = pydicom.dcmread(pydicom_file("examples_ybr_color.dcm"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    frames[1] = b"\xff\xd8\xff\xe0" + b"\x13" * 500 + b"\xff\xd9"
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return stored(ds)


def decode(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def pixels_of(response: httpx.Response) -> np.ndarray:
    assert response.headers["content-type"] == "image/png", response.headers
    return np.asarray(decode(response))


def linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 to 0..255."""
    x = x.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, np.where(x > center - 0.5 + (width - 1) / 2, 255, y))
    return np.rint(y).astype(np.uint8)


def linear_exact(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.2 to 0..255."""
    x = x.astype(np.float64)
    y = ((x - center) / width + 0.5) * 255
    return np.rint(np.clip(y, 0, 255)).astype(np.uint8)


def sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.3.1 to 0..255."""
    return np.rint(255 / (1 + np.exp(-4 * (x.astype(np.float64) - center) / width))).astype(np.uint8)


def min_max(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.rint((x - x.min()) * 255 / (x.max() - x.min())).astype(np.uint8)


# -- shared data -----------------------------------------------------------------------------------------------------
@dataclass
class Data:
    ct: Stored  # 8x16 signed, slope 1 intercept -1024, window 40/400 in the file
    ct_sloped: Stored  # same values, slope 2 intercept -2048, no window
    mono1: Stored  # MONOCHROME1 8-bit, no window
    rgb: Stored  # 6x10 RGB, known pattern
    palette: Stored  # examples_palette.dcm
    ybr_jpeg: Stored  # SC_rgb_jpeg_dcmtk.dcm: YBR_FULL JPEG baseline
    large: Stored  # examples_rgb_color.dcm, 320x240 RGB
    multi: Stored  # 5 frames of 4x6 uint16, frame n filled with a distinct ramp
    broken: Stored  # 30 JPEG frames, frame 2 corrupt
    bomb: Stored  # declares 30000 x 30000 x 1000 frames, holds 32 bytes
    short: Stored  # declares 4000 x 4000, holds 32 bytes (under the decode limit: a decode failure)
    sr: Stored  # no pixel data
    pdf: Stored
    cda: Stored
    video: Stored
    study: str  # two series: the first (by UID) has an SR and three images, the second one image
    study_images: list[Stored]


def multi_frame_pixels() -> np.ndarray:
    """Frame n: a ramp rolled by 5n, offset by 500n (distinct even after each frame's min/max scaling)."""
    return np.stack([np.roll(np.arange(24, dtype=np.uint16) * 37, 5 * n).reshape(4, 6) + n * 500 for n in range(5)])


@pytest.fixture(scope="module")
def data(server: Server) -> Data:
    study, base = new_uid(), new_uid()
    first, second = f"{base}.1", f"{base}.2"  # ordered the same way by every collation
    study_images = [
        image(np.arange(16, dtype=np.uint8).reshape(4, 4) * (k + 1), study=study, series=first) for k in range(3)
    ]
    tail = image(np.arange(16, dtype=np.uint8).reshape(4, 4) * 9, study=study, series=second)
    sr = reuid(pydicom_file("test-SR.dcm"), study=study, series=first)
    bomb = make_dataset(rows=4, columns=4, Rows=30000, Columns=30000, NumberOfFrames=1000)
    short = make_dataset(rows=4, columns=4, Rows=4000, Columns=4000)
    fixture = Data(
        ct=image(CT_VALUES, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400),
        ct_sloped=image(CT_VALUES, RescaleSlope=2, RescaleIntercept=-2048),
        mono1=image(np.arange(32, dtype=np.uint8).reshape(4, 8) * 3 + 10, PhotometricInterpretation="MONOCHROME1"),
        rgb=image(np.arange(180, dtype=np.uint8).reshape(6, 10, 3)),
        palette=reuid(pydicom_file("examples_palette.dcm")),
        ybr_jpeg=reuid(pydicom_file("SC_rgb_jpeg_dcmtk.dcm")),
        large=reuid(pydicom_file("examples_rgb_color.dcm")),
        multi=image(multi_frame_pixels()),
        broken=corrupt_second_frame(),
        bomb=stored(bomb),
        short=stored(short),
        sr=reuid(pydicom_file("test-SR.dcm")),
        pdf=document(PDF_CLASS, PDF_BYTES, "application/pdf"),
        cda=document(CDA_CLASS, CDA_BYTES, "text/XML"),
        video=video(),
        study=study,
        study_images=[*study_images, tail],
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        singles = [v for v in vars(fixture).values() if isinstance(v, Stored)]
        store(client, *singles)
        store(client, sr, *study_images)  # one request: stored (and watermarked) in this order
        store(client, tail)
    return fixture


def get(http: httpx.Client, path: str, accept: str | None = None, **params) -> httpx.Response:
    return http.get(path, params=params, headers={"Accept": accept} if accept else {})


# -- the grayscale pipeline ----------------------------------------------------------------------------------------
def test_rescale_and_file_window(http: httpx.Client, data: Data) -> None:
    response = get(http, data.ct.path() + "/rendered", "image/png")
    expected = linear(CT_VALUES.astype(np.float64) - 1024, 40, 400)
    assert (pixels_of(response) == expected).all()
    assert expected[0, 0] == 0 and expected[0, 13] == 255 and 0 < expected[0, 4] < 255  # clips both ends


def test_window_parameter_overrides_the_file(http: httpx.Client, data: Data) -> None:
    hu = CT_VALUES.astype(np.float64) - 1024
    for text, expected in [
        ("300,1500", linear(hu, 300, 1500)),
        ("0,100,LINEAR_EXACT", linear_exact(hu, 0, 100)),
        ("0,100,linear-exact", linear_exact(hu, 0, 100)),
        ("40,400,sigmoid", sigmoid(hu, 40, 400)),
        ("-500.5,2000.5", linear(hu, -500.5, 2000.5)),
    ]:
        actual = pixels_of(get(http, data.ct.path() + "/rendered", "image/png", window=text))
        assert (actual == expected).all(), text


def test_no_window_uses_min_max_after_rescale(http: httpx.Client, data: Data) -> None:
    actual = pixels_of(get(http, data.ct_sloped.path() + "/rendered", "image/png"))
    assert (actual == min_max(CT_VALUES.astype(np.float64) * 2 - 2048)).all()
    assert actual[0, 0] == 0 and actual[0, 13] == 255


def test_monochrome1_is_inverted(http: httpx.Client, data: Data) -> None:
    values = np.arange(32, dtype=np.uint8).reshape(4, 8) * 3 + 10
    actual = pixels_of(get(http, data.mono1.path() + "/rendered", "image/png"))
    assert (actual == 255 - min_max(values)).all()
    assert actual[0, 0] == 255 and actual[-1, -1] == 0


def lut(first: int, bits: int, values: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(values), first, bits]
    item.add_new("LUTData", "US", values)
    return item


def test_lut_sequences_and_presentation_shape(http: httpx.Client) -> None:
    stored_values = np.arange(8, dtype=np.uint16).reshape(2, 4)
    modality = [100, 90, 80, 70, 60, 50, 40, 300]  # not monotonic
    voi = [v // 2 for v in range(512)]  # 8-bit output: 0..255 as they are
    items = {
        "modality LUT": image(stored_values, ModalityLUTSequence=[lut(0, 16, modality)]),
        "modality + VOI LUT": image(
            stored_values, ModalityLUTSequence=[lut(0, 16, modality)], VOILUTSequence=[lut(0, 8, voi)]
        ),
        "window wins over VOI LUT": image(
            stored_values, VOILUTSequence=[lut(0, 8, [255] * 8)], WindowCenter=4, WindowWidth=8
        ),
        "presentation INVERSE": image(stored_values, PresentationLUTShape="INVERSE"),
    }
    store(http, *items.values())
    mapped = np.array(modality)[stored_values]
    expected = {
        "modality LUT": min_max(mapped),
        "modality + VOI LUT": np.array(voi, dtype=np.uint8)[mapped],
        "window wins over VOI LUT": linear(stored_values, 4, 8),
        "presentation INVERSE": 255 - min_max(stored_values),
    }
    for name, item in items.items():
        actual = pixels_of(get(http, item.path() + "/rendered", "image/png"))
        assert (actual == expected[name]).all(), (name, actual, expected[name])


def test_enhanced_functional_groups(http: httpx.Client) -> None:
    """Rescale in the shared functional groups, a window per frame in the per-frame groups."""
    frames = np.stack([np.arange(16, dtype=np.uint16).reshape(4, 4) * 10 + 100 * n for n in range(2)])
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -100, "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    windows = [(100, 200), (300, 50)]
    per_frame = []
    for center, width in windows:
        voi, group = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    item = image(frames, SharedFunctionalGroupsSequence=[shared], PerFrameFunctionalGroupsSequence=per_frame)
    store(http, item)
    for n, (center, width) in enumerate(windows, 1):
        actual = pixels_of(get(http, f"{item.path()}/frames/{n}/rendered", "image/png"))
        assert (actual == linear(frames[n - 1].astype(np.float64) * 2 - 100, center, width)).all(), n


# -- colour ----------------------------------------------------------------------------------------------------------
def test_rgb_png_is_exact(http: httpx.Client, data: Data) -> None:
    response = get(http, data.rgb.path() + "/rendered", "image/png")
    assert decode(response).mode == "RGB"
    assert (pixels_of(response) == np.arange(180, dtype=np.uint8).reshape(6, 10, 3)).all()


def test_palette_color_is_applied(http: httpx.Client, data: Data) -> None:
    ds = pydicom.dcmread(pydicom_file("examples_palette.dcm"))
    expected = np.rint(apply_color_lut(ds.pixel_array, ds) / 65535 * 255).astype(np.uint8)  # 16-bit entries
    actual = pixels_of(get(http, data.palette.path() + "/rendered", "image/png"))
    assert actual.shape == (ds.Rows, ds.Columns, 3)
    assert (actual == expected).all()


def test_ybr_full_jpeg_becomes_rgb(http: httpx.Client, data: Data) -> None:
    actual = pixels_of(get(http, data.ybr_jpeg.path() + "/rendered", "image/png"))
    # SC_rgb_* test images are bands of red, light red, green, light green, blue, light blue, black, greys, white
    bands = [(255, 0, 0), (255, 128, 128), (0, 255, 0), (128, 255, 128), (0, 0, 255), (128, 128, 255)]
    bands += [(0, 0, 0), (64, 64, 64), (192, 192, 192), (255, 255, 255)]
    for band, colour in enumerate(bands):
        assert np.abs(actual[band * 10 + 5, 50].astype(int) - colour).max() <= 6, (band, actual[band * 10 + 5, 50])


# -- frames ----------------------------------------------------------------------------------------------------------
def test_each_frame_renders_that_frame(http: httpx.Client, data: Data) -> None:
    frames = multi_frame_pixels()
    for n in range(1, 6):
        actual = pixels_of(get(http, f"{data.multi.path()}/frames/{n}/rendered", "image/png"))
        assert (actual == min_max(frames[n - 1])).all(), n
    instance = pixels_of(get(http, data.multi.path() + "/rendered", "image/png"))
    assert (instance == min_max(frames[0])).all()


def test_gif_has_every_frame(http: httpx.Client, data: Data) -> None:
    response = get(http, data.multi.path() + "/rendered", "image/gif")
    assert response.headers["content-type"] == "image/gif"
    gif = decode(response)
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (6, 4)
    gif.seek(3)
    assert (np.asarray(gif.convert("L")) == min_max(multi_frame_pixels()[3])).all()
    single = decode(get(http, f"{data.multi.path()}/frames/2/rendered", "image/gif"))
    assert single.n_frames == 1


def test_only_the_requested_frame_is_decoded(http: httpx.Client, data: Data) -> None:
    """Frame 2 cannot be decoded; frames 1 and 3 render, so nothing decodes frames other than the one asked for."""
    assert decode(get(http, f"{data.broken.path()}/frames/1/rendered")).size == (320, 240)
    assert decode(get(http, f"{data.broken.path()}/frames/3/rendered")).size == (320, 240)
    failed = get(http, f"{data.broken.path()}/frames/2/rendered")
    assert (failed.status_code, failed.text) == (406, RENDER_FAILED)
    assert get(http, data.broken.path() + "/rendered", "image/gif").status_code == 406  # needs every frame


# -- viewport, formats, quality --------------------------------------------------------------------------------------
def test_viewport_fits_inside_keeping_aspect(http: httpx.Client, data: Data) -> None:
    path = data.large.path() + "/rendered"  # 320 x 240
    for viewport, size in [("160,160", (160, 120)), ("640,100", (133, 100)), ("1000,1000", (1000, 750))]:
        assert decode(get(http, path, viewport=viewport)).size == size, viewport
    assert decode(get(http, path)).size == (320, 240)


def test_viewport_source_region(http: httpx.Client, data: Data) -> None:
    rgb = np.arange(180, dtype=np.uint8).reshape(6, 10, 3)
    crop = pixels_of(get(http, data.rgb.path() + "/rendered", "image/png", viewport="4,3,2,1,4,3"))
    assert (crop == rgb[1:4, 2:6]).all()
    flipped = pixels_of(get(http, data.rgb.path() + "/rendered", "image/png", viewport="4,3,5,1,-4,3"))
    assert (flipped == rgb[1:4, 2:6][:, ::-1]).all()


def test_quality_changes_the_jpeg(http: httpx.Client, data: Data) -> None:
    path = data.large.path() + "/rendered"
    best = get(http, path, quality="100")
    worst = get(http, path, quality="1")
    assert decode(best).format == decode(worst).format == "JPEG"
    assert len(worst.content) * 3 < len(best.content)
    assert get(http, path).content == best.content  # 100 is the default


def test_accept_rules(http: httpx.Client, data: Data) -> None:
    path = data.ct.path() + "/rendered"
    for accept, media in [
        (None, "image/jpeg"),
        ("image/jpeg", "image/jpeg"),
        ("IMAGE/PNG", "image/png"),
        ("image/png; q=0.5", "image/png"),
        ("*/*", "image/jpeg"),  # PS3.18 default (Azure: 406)
        ("image/gif", "image/gif"),
    ]:
        response = get(http, path, accept)
        assert response.status_code == 200 and response.headers["content-type"] == media, accept
        assert decode(response).format == media.split("/")[1].upper()
    for accept in ["application/jpeg", "application/dicom", "image/jp2", "text/html"]:
        assert get(http, path, accept).status_code == 406, accept
    for headers in [{"Accept": "image/jpeg, image/png"}, [("Accept", "image/png"), ("Accept", "image/jpeg")]]:
        response = http.get(path, headers=headers)
        assert (response.status_code, response.text) == (406, MULTIPLE_ACCEPT)


def test_etag_and_not_modified(http: httpx.Client, data: Data) -> None:
    path = data.ct.path() + "/rendered"
    first = get(http, path)
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"
    again = http.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = get(http, path, "image/png")
    assert other.headers["etag"] != etag
    assert http.get(path, headers={"If-None-Match": '"0-0"'}).status_code == 200


# -- documents and video -----------------------------------------------------------------------------------------------
def test_documents_and_video_are_returned_as_stored(http: httpx.Client, data: Data) -> None:
    for item, media, content in [
        (data.pdf, "application/pdf", PDF_BYTES),
        (data.cda, "text/xml", CDA_BYTES),
        (data.video, "video/mp4", VIDEO_BYTES),
    ]:
        for accept in [None, "*/*", media]:
            response = get(http, item.path() + "/rendered", accept)
            assert response.status_code == 200, (media, accept, response.text)
            assert response.headers["content-type"].split(";")[0] == media
            assert response.content == content
        assert get(http, item.path() + "/rendered", "image/png").status_code == 406
        assert get(http, item.path() + "/thumbnail").status_code == 406
        etag = response.headers["etag"]
        assert http.get(item.path() + "/rendered", headers={"If-None-Match": etag}).status_code == 304


def test_document_has_no_frames(http: httpx.Client, data: Data) -> None:
    response = get(http, data.pdf.path() + "/frames/1/rendered")
    assert response.status_code == 404


# -- study and series ------------------------------------------------------------------------------------------------
def test_study_and_series_render_their_representative(http: httpx.Client, data: Data) -> None:
    """The middle image instance (storage order) of the first series (UID order); the SR is passed over."""
    middle = data.study_images[1]
    expected = get(http, middle.path() + "/rendered", "image/png").content
    assert get(http, f"/v2/studies/{data.study}/rendered", "image/png").content == expected
    assert get(http, f"/v2/studies/{data.study}/series/{middle.series}/rendered", "image/png").content == expected
    tail = data.study_images[-1]
    tail_expected = get(http, tail.path() + "/rendered", "image/png").content
    assert get(http, f"/v2/studies/{data.study}/series/{tail.series}/rendered", "image/png").content == tail_expected
    thumb = get(http, f"/v2/studies/{data.study}/thumbnail", "image/png")
    assert thumb.content == get(http, middle.path() + "/thumbnail", "image/png").content


# -- thumbnails --------------------------------------------------------------------------------------------------------
def test_thumbnails_are_small_and_cached(http: httpx.Client, server: Server, data: Data) -> None:
    path = data.large.path() + "/thumbnail"
    first = get(http, path)
    thumb = decode(first)
    assert thumb.format == "JPEG" and thumb.size == (128, 96)
    cached = [p for p in (server.data_dir / "thumbnails").rglob("*.jpg") if p.read_bytes() == first.content]
    assert len(cached) == 1
    # The second answer comes from the cache file: replace it and the server hands back the replacement.
    marker = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(marker, "JPEG")
    cached[0].write_bytes(marker.getvalue())
    assert get(http, path).content == marker.getvalue()
    assert http.get(path, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    assert decode(get(http, path, "image/png")).size == (128, 96)
    assert decode(get(http, path, viewport="64,64")).size == (64, 48)
    assert decode(get(http, f"{data.multi.path()}/frames/3/thumbnail", "image/png")).size == (6, 4)  # not enlarged
    frame = pixels_of(get(http, f"{data.multi.path()}/frames/3/thumbnail", "image/png"))
    assert (frame == min_max(multi_frame_pixels()[2])).all()
    assert get(http, path, "image/gif").status_code == 406


def test_deleted_instance_has_no_thumbnail(http: httpx.Client, server: Server) -> None:
    item = image(np.arange(64, dtype=np.uint8).reshape(8, 8))
    store(http, item)
    assert get(http, item.path() + "/thumbnail").status_code == 200
    assert http.delete(item.path()).status_code == 204
    response = get(http, item.path() + "/thumbnail")
    assert (response.status_code, response.text) == (404, "The specified instance cannot be found.")


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["rendered", "thumbnail"])
def test_parameter_errors(http: httpx.Client, data: Data, suffix: str) -> None:
    path = f"{data.ct.path()}/{suffix}"
    for quality in ["0", "101", "-5", "abc", ""]:
        response = get(http, path, quality=quality)
        assert (response.status_code, response.text) == (400, BAD_QUALITY), quality
    for window in ["40", "a,b", "40,400,cubic", "40,0", "40,0.5", "40,0,sigmoid", "40,400,linear,1", "nan,3"]:
        response = get(http, path, window=window)
        assert response.status_code == 400 and "window" in response.text, window
    for viewport in ["100", "0,10", "10,-1", "a,b", "10,10,1,1,0,2", "10,10,-1,0,2,2", "10,10,1", "9000,10"]:
        response = get(http, path, viewport=viewport)
        assert response.status_code == 400 and "viewport" in response.text, viewport
    for frame in ["0", "-1", "x", "1,2"]:
        response = get(http, f"{data.ct.path()}/frames/{frame}/{suffix}")
        assert response.status_code == 400 and "frame" in response.text.lower(), frame
    response = get(http, f"{data.ct.path()}/frames/2/{suffix}")
    assert (response.status_code, response.text) == (404, "The specified frame 2 cannot be found.")


@pytest.mark.parametrize("suffix", ["rendered", "thumbnail"])
def test_not_found(http: httpx.Client, data: Data, suffix: str) -> None:
    item = data.ct
    for path, level in [
        (f"/v2/studies/{new_uid()}/{suffix}", "study"),
        (f"/v2/studies/{item.study}/series/{new_uid()}/{suffix}", "series"),
        (f"/v2/studies/{item.study}/series/{item.series}/instances/{new_uid()}/{suffix}", "instance"),
        (f"/v2/studies/{item.study}/series/{item.series}/instances/{new_uid()}/frames/1/{suffix}", "instance"),
    ]:
        response = get(http, path)
        assert (response.status_code, response.text) == (404, f"The specified {level} cannot be found."), path
    assert get(http, f"/v2/studies/1.2.abc/{suffix}").status_code == 400


def test_images_that_cannot_be_rendered(http: httpx.Client, data: Data) -> None:
    bomb = get(http, data.bomb.path() + "/rendered")
    assert bomb.status_code == 406 and "above the supported limit" in bomb.text
    assert get(http, data.bomb.path() + "/thumbnail").status_code == 406
    short = get(http, data.short.path() + "/rendered")
    assert (short.status_code, short.text) == (406, RENDER_FAILED)
    no_pixels = get(http, data.sr.path() + "/rendered")
    assert (no_pixels.status_code, no_pixels.text) == (406, f"{RENDER_FAILED}: the instance has no pixel data.")
    assert get(http, data.sr.path() + "/frames/1/rendered").status_code == 404


def test_limits(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A file over the transcode size limit is a 406; the thumbnail cache stays within its bound."""
    limited = start_server(tmp_path_factory, "sqlite", max_transcode_size="50000", thumbnail_cache_size="40000")
    try:
        with httpx.Client(base_url=limited.url, timeout=60) as client:
            big = reuid(pydicom_file("examples_rgb_color.dcm"))  # ~230 KB
            rng = np.random.default_rng(7)
            noisy = [image(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
            store(client, big, *noisy)
            response = client.get(big.path() + "/rendered")
            assert response.status_code == 406 and "above the supported limit of 50000" in response.text
            thumbs = [client.get(n.path() + "/thumbnail", headers={"Accept": "image/png"}).content for n in noisy]
            assert sum(len(t) for t in thumbs) > 40000  # more than the cache may hold
            files = list((limited.data_dir / "thumbnails").rglob("*.png"))
            assert sum(p.stat().st_size for p in files) <= 40000
            assert thumbs[-1] in {p.read_bytes() for p in files}  # the newest is kept
    finally:
        limited.stop()


# -- every decodable pydicom test file ---------------------------------------------------------------------------------
def decodable_test_files() -> list[Path]:
    """pydicom's bundled (offline) test files with pixel data it can decode itself."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*")):
            try:
                ds = pydicom.dcmread(path)
                if "PixelData" in ds and ds.file_meta.get("TransferSyntaxUID") and ds.pixel_array.size:
                    reuid(path)  # and it can be written again
                    found.append(path)
            except Exception:
                continue
    return found


@pytest.mark.parametrize("path", decodable_test_files(), ids=lambda p: p.name)
def test_every_decodable_test_file_renders(http: httpx.Client, path: Path) -> None:
    item = reuid(path)
    store(http, item)
    for accept, media in [("image/png", "PNG"), ("image/jpeg", "JPEG")]:
        rendered = decode(get(http, item.path() + "/rendered", accept))
        assert rendered.format == media and rendered.size == (item.ds.Columns, item.ds.Rows)
        rendered.load()
    thumb = decode(get(http, item.path() + "/thumbnail"))
    assert max(thumb.size) <= 128


def test_jpeg_baseline_is_listed() -> None:
    """The decodable set includes the compressed syntaxes the pipeline must handle, not only native files."""
    syntaxes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in decodable_test_files()
    }
    assert {JPEGBaseline8Bit, "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99"} <= syntaxes
