"""Pixel defects found storing a third-party corpus and comparing with Orthanc (issue 8 §5), against a real server:
big-endian native frames served in compressed syntaxes, JPEG Extended 12-bit, image pixel attributes a file leaves
out (the values viewers assume), and images without pixel data.

Expected pixels are pydicom's decode of the source, or DCMTK's (``dcmdjpeg``, the IJG codec Orthanc uses too).
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from tests.factory import make_dataset, new_uid
from tests.servers import Server
from tests.test_transcode import (
    BIG,
    EXPLICIT,
    FRAME_REQUESTS,
    JLS,
    RLE,
    assert_frame,
    encodable,
    frame_codestream_pixels,
)
from tests.test_wado import Stored, assert_media, parse_multipart, pydicom_file, reuid, store, stored

OCTET = "application/octet-stream"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
RENDER_FAILED = "An error was encountered when attempting to convert the dicom file into an image"
DCMTK = shutil.which("dcmcjpeg") and shutil.which("dcmdjpeg")


def _frame_pixels(ds: Dataset, index: int, **options) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pixel_array(ds, index=index, **options)


def _png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def _fresh_uids(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _rewritten(ds: Dataset) -> Dataset:
    """``ds`` written in the syntax its file meta names and read back (pydicom's save_as keeps a read file's byte
    order)."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    buffer = io.BytesIO()
    pydicom.dcmwrite(
        buffer, ds, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian, enforce_file_format=True
    )
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# -- 1. big-endian native sources ------------------------------------------------------------------------------------
def _big_endian(values: np.ndarray, bits_stored: int, signed: bool, pixel_vr: str | None = None) -> Dataset:
    """Explicit VR Big Endian dataset of ``values`` (frames, rows, columns), its Pixel Data in big-endian order."""
    frames, rows, columns = values.shape
    ds = make_dataset(rows=rows, columns=columns, frames=frames, transfer_syntax=BIG)
    bits = values.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        bits,
        bits_stored,
        bits_stored - 1,
        int(signed),
    )
    raw = values.astype(values.dtype.newbyteorder(">")).tobytes()
    pixel_vr = pixel_vr or ("OB" if bits == 8 else "OW")
    if bits == 8 and pixel_vr == "OW":  # 8-bit samples in 16-bit words: each word's bytes swap (PS3.5 OW order)
        raw = np.frombuffer(raw, dtype="<u2").byteswap().tobytes()
    ds.PixelData = raw
    ds["PixelData"].VR = pixel_vr
    return _rewritten(ds)


def big_endian_sources() -> dict[str, Stored]:
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:40, 0:36]
    ramp = np.array([x * 1500 + y * 90 + f * 700 for f in range(3)])
    noise = rng.integers(0, 8, ramp.shape)
    # signed values stay inside the range lossy JPEG-LS takes for them (its NEAR error must not wrap a sign)
    generated = {
        "u16-3frames": _big_endian((ramp + noise * 8).astype(np.uint16), 16, signed=False),
        "s16-12bit-3frames": _big_endian((ramp // 32 - 1000 + noise).astype(np.int16), 12, signed=True),
        "u8-ob-3frames": _big_endian((ramp // 300).astype(np.uint8), 8, signed=False),
        "s8-ob-2frames": _big_endian((ramp[:2] // 400 - 70).astype(np.int8), 8, signed=True),
        "u8-ow-2frames": _big_endian((ramp[:2] // 300).astype(np.uint8), 8, signed=False, pixel_vr="OW"),
    }
    sources = {name: stored(ds) for name, ds in generated.items()}
    for name in ("MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm", "SC_rgb_small_odd_big_endian.dcm", "rtdose_expb.dcm"):
        sources[name] = reuid(pydicom_file(name))
    return sources


def little_endian_twin(inst: Stored) -> Stored:
    """The same image in explicit VR little endian: pydicom's decode of the big-endian file, written again."""
    ds = copy.deepcopy(inst.ds)
    values = _frame_pixels(inst.ds, None)
    raw = values.astype(values.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = raw + b"\0" * (len(raw) % 2)
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    if int(ds.SamplesPerPixel) > 1:
        ds.PlanarConfiguration = 0  # as decoded
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT)
    return stored(_rewritten(_fresh_uids(ds)))


@pytest.fixture(scope="module")
def big_endian(server: Server) -> dict[str, tuple[Stored, Stored]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = {name: (inst, little_endian_twin(inst)) for name, inst in big_endian_sources().items()}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        store(client, *(inst for pair in pairs.values() for inst in pair))
    return pairs


def _frame_numbers(inst: Stored) -> list[int]:
    count = int(inst.ds.get("NumberOfFrames", 1) or 1)
    return sorted({1, (count + 1) // 2, count})


@pytest.mark.parametrize(("media", "param", "syntax"), FRAME_REQUESTS)
def test_big_endian_frames_in_every_media_type(http, big_endian, media, param, syntax):
    """Each frame of 8/16/32-bit, signed/unsigned, OB/OW, single and multi-frame big-endian sources: the pixels
    pydicom decodes from the source (lossy syntaxes within the PSNR bound), or a 406 where the syntax cannot hold
    them."""
    accept = f"{media}; transfer-syntax={param}" if param else media
    for name, (inst, _) in big_endian.items():
        for n in _frame_numbers(inst):
            response = http.get(f"{inst.path()}/frames/{n}", headers={"Accept": accept})
            if not encodable(inst.ds, syntax):
                assert response.status_code == 406, (name, accept, response.status_code)
                continue
            assert response.status_code == 200, (name, n, accept, response.text)
            assert_frame(response.content, response.headers["content-type"], inst, n, media, syntax)


def test_big_endian_frames_multipart(http, big_endian):
    """Several frames in one multipart answer: octet-stream parts are little endian (PS3.18); the stored big-endian
    bytes only when asked for as stored (``*``), labelled as such."""
    for name, (inst, _) in big_endian.items():
        numbers = _frame_numbers(inst)[::-1]
        path = f"{inst.path()}/frames/{','.join(map(str, numbers))}"
        for accept, syntax in (
            (f'multipart/related; type="{OCTET}"', EXPLICIT),
            ('multipart/related; type="image/dicom-rle"', RLE),
            ('multipart/related; type="image/jls"', JLS),
        ):
            response = http.get(path, headers={"Accept": accept})
            if not encodable(inst.ds, syntax):
                assert response.status_code == 406, (name, accept)
                continue
            parts = parse_multipart(response)
            assert len(parts) == len(numbers), name
            for part, n in zip(parts, numbers, strict=True):
                media = part.content_type.split(";")[0]
                assert_frame(part.data, part.content_type, inst, n, media, syntax)
        [part] = parse_multipart(http.get(f"{inst.path()}/frames/1", headers={"Accept": "*/*"}))
        assert_media(part.content_type, OCTET, BIG)
        ds = inst.ds
        frame_length = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
        assert part.data == ds.PixelData[:frame_length], name


def test_big_endian_renders_as_its_little_endian_twin(http, big_endian):
    for name, (inst, twin) in big_endian.items():
        for n in _frame_numbers(inst):
            got = _png(http.get(f"{inst.path()}/frames/{n}/rendered", headers={"Accept": "image/png"}))
            want = _png(http.get(f"{twin.path()}/frames/{n}/rendered", headers={"Accept": "image/png"}))
            assert np.array_equal(got, want), (name, n)


# -- 2. JPEG Extended 12-bit -------------------------------------------------------------------------------------------
def _dcmtk(tool: str, options: list[str], source: Path, out: Path) -> Path:
    subprocess.run([tool, *options, str(source), str(out)], check=True, capture_output=True)
    return out


def jpeg_extended_pairs(tmp: Path) -> dict[str, tuple[Stored, Stored]]:
    """(.51 source, its DCMTK dcmdjpeg decode in explicit VR LE) for pydicom's 12-bit files (JPEG-lossy.dcm has scan
    parameters libjpeg refuses and IJG accepts), a 3-frame 12-bit file and an 8-bit colour one (dcmcjpeg +ee)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:48, 0:40]
    grey = make_dataset(rows=48, columns=40, frames=3, BitsStored=12, HighBit=11)
    frames = np.array([(x * 80 + y * 20 + f * 300 + rng.integers(0, 40, x.shape)) % 4096 for f in range(3)])
    grey.PixelData = frames.astype(np.uint16).tobytes()
    colour = make_dataset(rows=48, columns=40, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    colour.BitsAllocated, colour.BitsStored, colour.HighBit, colour.PlanarConfiguration = 8, 8, 7, 0
    colour.PixelData = np.stack([x * 6, y * 5, (x + y) * 2], axis=-1).astype(np.uint8).tobytes()
    sources = {
        "JPEG-lossy.dcm": Path(pydicom_file("JPEG-lossy.dcm")),
        "JPGExtended.dcm": Path(pydicom_file("JPGExtended.dcm")),
    }
    for name, ds in (("grey12-3frames", grey), ("rgb8", colour)):
        ds.save_as(tmp / f"{name}.dcm", enforce_file_format=True)
        sources[name] = _dcmtk("dcmcjpeg", ["+ee"], tmp / f"{name}.dcm", tmp / f"{name}-ee.dcm")
    pairs = {}
    for name, path in sources.items():
        reference = _dcmtk("dcmdjpeg", [], path, tmp / f"{name}-ref.dcm")
        source = reuid(path)
        assert source.transfer_syntax == JPEG_EXTENDED
        pairs[name] = (source, reuid(reference))
    return pairs


@pytest.fixture(scope="module")
def jpeg_extended(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Stored, Stored]]:
    if not DCMTK:
        pytest.skip("DCMTK (dcmcjpeg, dcmdjpeg) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = jpeg_extended_pairs(tmp_path_factory.mktemp("jpeg-extended"))
    with httpx.Client(base_url=server.url, timeout=120) as client:
        store(client, *(inst for pair in pairs.values() for inst in pair))
    return pairs


def assert_as_dcmtk(got: np.ndarray, want: np.ndarray, label: object) -> None:
    """Greyscale exactly as DCMTK decodes it (the same IJG codec). Colour: IJG leaves YCbCr to the caller, and
    pydicom's conversion to RGB rounds a sample differently from IJG's now and then: by 1 at most, measured on 2
    samples of 5,760 here (pylibjpeg: by up to 3, on 1,108)."""
    assert got.shape == want.shape, label
    difference = np.abs(got.astype(np.int64) - want.astype(np.int64))
    if got.ndim == 3 and got.shape[-1] == 3:
        assert difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 1000, label
    else:
        assert difference.max() == 0, (label, difference.max())


def test_jpeg_extended_transcodes_as_dcmtk_decodes(http, jpeg_extended):
    """The whole instance in explicit VR LE and in JPEG-LS lossless: DCMTK's pixels (GDCM's IJG codec, the one
    DCMTK and Orthanc use; pylibjpeg's libjpeg refuses JPEG-lossy.dcm)."""
    for name, (inst, reference) in jpeg_extended.items():
        for target in (EXPLICIT, JLS):
            response = http.get(inst.path(), headers={"Accept": f"application/dicom; transfer-syntax={target}"})
            assert response.status_code == 200, (name, target, response.text)
            got = pydicom.dcmread(io.BytesIO(response.content))
            assert got.file_meta.TransferSyntaxUID == target
            assert got.PhotometricInterpretation == reference.ds.PhotometricInterpretation, name
            assert_as_dcmtk(got.pixel_array, reference.ds.pixel_array, (name, target))


def test_jpeg_extended_frames_as_dcmtk_decodes(http, jpeg_extended):
    for name, (inst, reference) in jpeg_extended.items():
        for n in _frame_numbers(inst):
            want = _frame_pixels(reference.ds, n - 1)
            for accept, syntax in ((OCTET, EXPLICIT), ("image/jls", JLS), ("image/dicom-rle", RLE)):
                response = http.get(f"{inst.path()}/frames/{n}", headers={"Accept": accept})
                assert response.status_code == 200, (name, accept, response.text)
                assert_media(response.headers["content-type"], accept, syntax)
                got = frame_codestream_pixels(response.content, reference.ds, syntax)
                assert_as_dcmtk(got, want, (name, n, accept))


def test_jpeg_extended_renders_as_dcmtk_decodes(http, jpeg_extended):
    """Rendered and thumbnail images of the .51 instance: those of DCMTK's decode of it, stored natively."""
    for name, (inst, reference) in jpeg_extended.items():
        for suffix in ("rendered", "thumbnail", "frames/1/rendered"):
            got = _png(http.get(f"{inst.path()}/{suffix}", headers={"Accept": "image/png"}))
            want = _png(http.get(f"{reference.path()}/{suffix}", headers={"Accept": "image/png"}))
            assert_as_dcmtk(got, want, (name, suffix))
        assert got.shape[:2] == (int(inst.ds.Rows), int(inst.ds.Columns))


# -- 3. image pixel attributes left out: the values viewers assume ---------------------------------------------------
def _grey(bits_stored: int = 12) -> Dataset:
    y, x = np.mgrid[0:36, 0:40]
    ds = make_dataset(rows=36, columns=40, frames=2, BitsStored=bits_stored, HighBit=bits_stored - 1)
    ds.PixelData = np.array([x * 90 + y * 7, x * 3 + y * 100]).astype(np.uint16).tobytes()
    return ds


def _rgb() -> Dataset:
    y, x = np.mgrid[0:36, 0:40]
    ds = make_dataset(rows=36, columns=40, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    ds.PixelData = np.stack([x * 6, y * 7, (x + y) * 3], axis=-1).astype(np.uint8).tobytes()
    return ds


def _rle(ds: Dataset) -> Dataset:
    ds.compress(RLE, generate_instance_uid=False)
    return ds


# (case, complete dataset, attribute left out, value viewers assume)
LEFT_OUT = [
    ("PixelRepresentation", _grey(), "PixelRepresentation", 0),
    ("PixelRepresentation-rle", _rle(_grey()), "PixelRepresentation", 0),
    ("PlanarConfiguration", _rgb(), "PlanarConfiguration", 0),
    ("PlanarConfiguration-rle", _rle(_rgb()), "PlanarConfiguration", 0),
    ("PhotometricInterpretation", _grey(), "PhotometricInterpretation", "MONOCHROME2"),
    ("SamplesPerPixel", _grey(), "SamplesPerPixel", 1),
    ("BitsStored", _grey(bits_stored=16), "BitsStored", 16),
]


@pytest.fixture(scope="module")
def left_out(server: Server) -> dict[str, tuple[Stored, Stored]]:
    """(the image without the attribute, the same image with it) per case."""
    pairs = {}
    for case, complete, keyword, _ in LEFT_OUT:
        lacking = copy.deepcopy(complete)
        delattr(lacking, keyword)
        pairs[case] = (stored(_fresh_uids(lacking)), stored(_fresh_uids(copy.deepcopy(complete))))
    with httpx.Client(base_url=server.url, timeout=120) as client:
        store(client, *(inst for pair in pairs.values() for inst in pair))
    return pairs


def _displayed(values: np.ndarray) -> np.ndarray:
    """What /rendered shows of a frame without a window: colour as is, greyscale scaled from its min/max."""
    if values.ndim == 3:
        return values
    scaled = (values.astype(np.float64) - values.min()) * 255 / (values.max() - values.min())
    return np.rint(scaled).astype(np.uint8)


@pytest.mark.parametrize(("case", "keyword", "assumed"), [(c, k, v) for c, _, k, v in LEFT_OUT])
def test_left_out_pixel_attributes_take_the_value_viewers_assume(http, left_out, case, keyword, assumed):
    """Rendered, thumbnail, frames in every media type and transcoded instances: the pixels of the complete twin;
    the stored file keeps the attribute left out."""
    inst, twin = left_out[case]
    assert keyword not in inst.ds and twin.ds[keyword].value == assumed
    for n in (1, int(twin.ds.get("NumberOfFrames", 1))):
        rendered = _png(http.get(f"{inst.path()}/frames/{n}/rendered", headers={"Accept": "image/png"}))
        assert np.array_equal(rendered, _displayed(_frame_pixels(twin.ds, n - 1))), (case, n)
        thumbnail = _png(http.get(f"{inst.path()}/frames/{n}/thumbnail", headers={"Accept": "image/png"}))
        twin_thumbnail = _png(http.get(f"{twin.path()}/frames/{n}/thumbnail", headers={"Accept": "image/png"}))
        assert np.array_equal(thumbnail, twin_thumbnail), (case, n)
        for media, param, syntax in FRAME_REQUESTS:
            accept = f"{media}; transfer-syntax={param}" if param else media
            response = http.get(f"{inst.path()}/frames/{n}", headers={"Accept": accept})
            if not encodable(twin.ds, syntax):
                assert response.status_code == 406, (case, accept)
                continue
            assert response.status_code == 200, (case, accept, response.text)
            assert_frame(response.content, response.headers["content-type"], twin, n, media, syntax)
    for target in (EXPLICIT, JLS, RLE):
        response = http.get(inst.path(), headers={"Accept": f"application/dicom; transfer-syntax={target}"})
        assert response.status_code == 200, (case, target, response.text)
        got = pydicom.dcmread(io.BytesIO(response.content))
        assert got.file_meta.TransferSyntaxUID == target
        if keyword not in got:
            got[keyword] = twin.ds[keyword]
        assert np.array_equal(got.pixel_array, twin.ds.pixel_array), (case, target)
    response = http.get(inst.path(), headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert response.content == inst.data


# -- 4. no pixel data --------------------------------------------------------------------------------------------------
def test_image_without_pixel_data_is_not_decoded(http, server: Server):
    """Image attributes but no Pixel Data: 406 naming the cause, with no decode attempted (no warning logged); its
    frames are not found."""
    ds = make_dataset(rows=20, columns=20)
    del ds.PixelData
    inst = stored(ds)
    store(http, inst)
    for suffix in ("rendered", "thumbnail", "frames/1/rendered", "frames/1/thumbnail"):
        response = http.get(f"{inst.path()}/{suffix}")
        assert response.status_code == 406, (suffix, response.status_code)
        assert response.text == f"{RENDER_FAILED}: the instance has no pixel data.", suffix
    response = http.get(f"{inst.path()}/frames/1", headers={"Accept": OCTET})
    assert response.status_code == 404
    assert "no pixel data" in response.text
    lines = [line for line in server.log_path.read_text().splitlines() if inst.sop in line]
    assert lines  # the request lines
    for line in lines:
        entry = json.loads(line)
        assert entry["level"] not in ("warning", "error"), entry
