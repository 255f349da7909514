"""Transcoding on retrieve, against a real server: every decodable file of pydicom's bundled test data (and three
generated 2.9 MB RGB files like Azure's samples) stored, retrieved in other syntaxes and decoded again with pydicom;
frames of multi-frame files made with independent encoders (DCMTK, pydicom) retrieved in each frame media type; the
decode size limit.

Pixels must match exactly for lossless targets and within a PSNR bound for lossy ones; the part Content-Type must
name the syntax sent; the file meta and every attribute but the image pixel description must be unchanged.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from dicomhub.dicom.transcode import decoding_plugin
from tests.factory import RGB_SAMPLES, make_dataset, make_rgb_sample, new_uid
from tests.servers import Server
from tests.test_wado import (
    BULK_VRS,
    MULTI_DICOM,
    Stored,
    assert_media,
    parse_multipart,
    reuid,
    store,
    stored,
)

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
LOSSY = {JPEG_BASELINE, JLS_NEAR, J2K}
NATIVE = {EXPLICIT, IMPLICIT, BIG, DEFLATED}
LOSSY_METHOD = {JPEG_BASELINE: "ISO_10918_1", JLS_NEAR: "ISO_14495_1", J2K: "ISO_15444_1"}
COMPRESSED_LOSSLESS = [J2K_LOSSLESS, RLE, JLS, JPEG_SV1, JPEG_LOSSLESS]
TARGETS = [EXPLICIT, IMPLICIT, BIG, DEFLATED, *COMPRESSED_LOSSLESS, *sorted(LOSSY)]
# Attributes a transcode may change: the pixel data, its colour description and the record of lossy steps
IMAGE_DESCRIPTION = {
    "PixelData",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
}
MIN_PSNR = 30.0  # dB, against the source's value range
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DCMTK = shutil.which("dcmcjpeg") and shutil.which("dcmcjpls") and shutil.which("dcmcrle")


def _decoded(ds: Dataset, index: int | None = None) -> np.ndarray | None:
    """pydicom's decoding, with the plugin the server uses: lossy JPEG decoders may differ by a unit or two."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pixel_array(ds, index=index, decoding_plugin=decoding_plugin(ds.file_meta.TransferSyntaxUID))
        except Exception:
            return None


def decodable_files() -> list[Path]:
    """Bundled pydicom files with file meta, UIDs and pixel data pydicom can decode."""
    found = []
    for path in sorted(PYDICOM_FILES.glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception:
            continue
        if "TransferSyntaxUID" not in ds.file_meta or "PixelData" not in ds or "SOPClassUID" not in ds:
            continue
        try:
            reuid(path)  # files pydicom cannot write back (no VR known for an element) are left out
        except Exception:
            continue
        if _decoded(ds) is not None:
            found.append(path)
    return found


FILES = decodable_files()
NAMES = [path.name for path in FILES] + list(RGB_SAMPLES)  # the corpus: pydicom's files, then the generated ones
# Every target for a representative subset: each source syntax, colour spaces, bit depths, multi-frame
CROSS = [
    "MR_small.dcm",  # 16-bit signed, explicit LE
    "MR_small_bigendian.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline YBR_FULL_422
    "SC_rgb_rle_2frame.dcm",  # RLE RGB, 2 frames
    "examples_jpeg2k.dcm",  # J2K lossless YBR_RCT
    "JPEG2000.dcm",  # lossy J2K
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1 RGB
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_palette.dcm",
    "rtdose.dcm",  # 32-bit, 15 frames: only native targets
    "liver_1frame.dcm",  # 1-bit: only native targets
    "image_dfl.dcm",  # deflated
]


def encodable(ds: Dataset, target: str) -> bool:
    """Whether ``target`` can hold the pixels of ``ds`` as decoded (PS3.5 8.2 as the codec libraries implement it)."""
    if target in NATIVE:
        return True
    bits, stored_bits = int(ds.BitsAllocated), int(ds.BitsStored)
    signed, samples = int(ds.PixelRepresentation), int(ds.SamplesPerPixel)
    palette = ds.PhotometricInterpretation == "PALETTE COLOR"
    if target == JPEG_BASELINE:
        return bits == stored_bits == 8 and not signed and not palette
    if target in (J2K_LOSSLESS, J2K):  # OpenJPEG's encoder uses 6 resolutions: 32 pixels a side at least
        small = min(int(ds.Rows), int(ds.Columns)) < 32
        return bits in (8, 16, 24) and stored_bits <= 24 and not small and not (palette and target == J2K)
    if bits not in (8, 16):
        return False
    frame_bytes = int(ds.Rows) * int(ds.Columns) * samples * bits // 8
    if target in (JPEG_LOSSLESS, JPEG_SV1):  # GDCM's encoder: frames of an even number of bytes
        return frame_bytes % 2 == 0
    if target == JLS and frame_bytes < 64:  # pyjpegls sizes its output to the input: a tiny frame overflows it
        return False
    if target in (JLS, JLS_NEAR):
        return stored_bits >= 2 and not (palette and target == JLS_NEAR) and not (samples == 3 and signed)
    return True


def expected_photometric(source: Dataset, target: str) -> str:
    """JPEG's own YCbCr and J2K's colour transforms are undone by decoding; other YBR data stays YBR_FULL."""
    pi = str(source.PhotometricInterpretation)
    syntax = source.file_meta.TransferSyntaxUID
    if target == syntax or (target in NATIVE and syntax in NATIVE):
        return pi
    if syntax in (JPEG_BASELINE, "1.2.840.10008.1.2.4.51") and pi.startswith("YBR") or pi in ("YBR_RCT", "YBR_ICT"):
        pi = "RGB"
    elif pi == "YBR_FULL_422":
        pi = "YBR_FULL"
    if target == JPEG_BASELINE and int(source.SamplesPerPixel) == 3:
        return "YBR_FULL_422"
    return pi


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    peak = max(float(ref.max()) - float(ref.min()), 1.0)
    mse = float(np.mean((got.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def assert_same_pixels(got: np.ndarray, ref: np.ndarray, lossy: bool, label: object) -> None:
    assert got.shape == ref.shape, label
    if lossy:
        assert psnr(got, ref) >= MIN_PSNR, (label, psnr(got, ref))
    else:
        assert np.array_equal(got, ref), label


def assert_transcoded(data: bytes, inst: Stored, target: str) -> None:
    """``data`` is ``inst`` in ``target``: meta updated, pixels kept, other attributes unchanged."""
    got = pydicom.dcmread(io.BytesIO(data))
    assert got.file_meta.TransferSyntaxUID == target
    assert got.file_meta.MediaStorageSOPInstanceUID == inst.sop
    assert got.file_meta.MediaStorageSOPClassUID == inst.ds.file_meta.MediaStorageSOPClassUID
    source = inst.ds
    label = (source.file_meta.TransferSyntaxUID, target)
    assert got.PhotometricInterpretation == expected_photometric(source, target), label
    lossy = target in LOSSY and target != source.file_meta.TransferSyntaxUID
    if lossy:
        assert got.LossyImageCompression == "01"
        methods = got.LossyImageCompressionMethod
        assert (methods[-1] if isinstance(methods, MultiValue) else methods) == LOSSY_METHOD[target]
    sent = {int(e.tag): e for e in source if e.keyword not in IMAGE_DESCRIPTION}
    kept = {int(e.tag): e for e in got if e.keyword not in IMAGE_DESCRIPTION}
    assert sent.keys() == kept.keys(), label
    same_order = UID(target).is_little_endian == source.file_meta.TransferSyntaxUID.is_little_endian
    for tag, elem in sent.items():
        if elem.tag.is_private and target == IMPLICIT:
            continue  # without VRs, private elements are read back as whatever pydicom guesses
        if elem.VR not in BULK_VRS and (elem.VR != "SQ" or same_order):
            assert kept[tag].value == elem.value, (label, elem)
    assert_same_pixels(_decoded(got), _decoded(source), lossy, label)


# -- whole instances -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(server: Server) -> dict[str, Stored]:
    """Every decodable file, re-UIDed, and the generated RGB files, stored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instances = {path.name: reuid(path) for path in FILES}
    instances.update({shape: stored(make_rgb_sample(shape)) for shape in RGB_SAMPLES})
    with httpx.Client(base_url=server.url, timeout=120) as client:
        names = list(instances)
        for i in range(0, len(names), 16):
            store(client, *(instances[name] for name in names[i : i + 16]))
    return instances


def retrieve(http: httpx.Client, inst: Stored, target: str, multipart: bool = False) -> httpx.Response:
    media = MULTI_DICOM if multipart else "application/dicom"
    return http.get(inst.path(), headers={"Accept": f"{media}; transfer-syntax={target}"})


def check_target(http: httpx.Client, inst: Stored, target: str, multipart: bool = False) -> None:
    """The instance in ``target``: transcoded and checked, or 406 naming the problem where the target cannot hold it."""
    response = retrieve(http, inst, target, multipart)
    source = inst.ds.file_meta.TransferSyntaxUID
    if target != source and not encodable(inst.ds, target):
        assert response.status_code == 406, (source, target, response.status_code)
        assert f"cannot be transcoded from '{source}' to '{target}'" in response.text
        return
    assert response.status_code == 200, (source, target, response.text)
    if multipart:
        [part] = parse_multipart(response)
        content_type, data = part.content_type, part.data
    else:
        content_type, data = response.headers["content-type"], response.content
    assert_media(content_type, "application/dicom", target)
    if target == source:
        assert data == inst.data
    assert_transcoded(data, inst, target)


def lossless_target(name: str, ds: Dataset) -> str:
    """A compressed lossless target for ``name``, rotating over the syntaxes so each gets a share of the files."""
    start = NAMES.index(name)
    candidates = COMPRESSED_LOSSLESS[start % 5 :] + COMPRESSED_LOSSLESS[: start % 5]
    return next((t for t in candidates if t != ds.file_meta.TransferSyntaxUID and encodable(ds, t)), candidates[0])


@pytest.mark.parametrize("name", NAMES)
def test_every_decodable_file_round_trips(http, corpus, name):
    """Explicit VR LE and one compressed lossless syntax (or a 406 where none can hold the pixels)."""
    inst = corpus[name]
    check_target(http, inst, EXPLICIT)
    check_target(http, inst, lossless_target(name, inst.ds), multipart=True)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", CROSS)
def test_every_target(http, corpus, name, target):
    check_target(http, corpus[name], target)


def test_lossy_targets_are_never_a_default(http, corpus):
    """Without a named syntax an instance comes as explicit VR LE (or as stored with */*), never lossy."""
    inst = corpus["MR_small.dcm"]
    for accept, syntax in (("application/dicom", EXPLICIT), (MULTI_DICOM, EXPLICIT), ("*/*", EXPLICIT)):
        response = http.get(inst.path(), headers={"Accept": accept})
        assert response.status_code == 200
        content_type = response.headers["content-type"]
        if content_type.startswith("multipart/"):
            [part] = parse_multipart(response)
            content_type = part.content_type
        assert_media(content_type, "application/dicom", syntax)


def test_transcoding_a_lossy_stored_instance_keeps_its_lossy_record(http, corpus):
    inst = corpus["JPEG2000.dcm"]
    response = retrieve(http, inst, JLS)
    assert response.status_code == 200
    got = pydicom.dcmread(io.BytesIO(response.content))
    assert got.get("LossyImageCompression") == inst.ds.get("LossyImageCompression")
    assert np.array_equal(got.pixel_array, inst.ds.pixel_array)


def test_htj2k_is_not_a_target(http, corpus):
    """No codec library here encodes HTJ2K: 406, while the stored syntax stays available."""
    inst = corpus["MR_small.dcm"]
    for multipart in (False, True):
        response = retrieve(http, inst, HTJ2K_LOSSLESS, multipart)
        assert response.status_code == 406
        assert f"cannot be transcoded from '{EXPLICIT}' to '{HTJ2K_LOSSLESS}'" in response.text
    response = http.get(f"{inst.path()}/frames/1", headers={"Accept": 'multipart/related; type="image/jphc"'})
    assert response.status_code == 406


def test_study_of_one_instance_in_a_compressed_syntax(http, corpus):
    inst = corpus["CT_small.dcm"]
    response = http.get(f"/v2/studies/{inst.study}", headers={"Accept": f"{MULTI_DICOM}; transfer-syntax={RLE}"})
    assert response.status_code == 200
    [part] = parse_multipart(response)
    assert_media(part.content_type, "application/dicom", RLE)
    assert_transcoded(part.data, inst, RLE)


def test_undecodable_pixel_data_is_not_acceptable(http):
    """A stored codestream the codecs reject: 406 with the reason, and the stored bytes with transfer-syntax=*."""
    ds = make_dataset(rows=8, columns=8)
    ds.file_meta.TransferSyntaxUID = UID(J2K_LOSSLESS)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds["PixelData"].is_undefined_length = True
    inst = stored(ds)
    store(http, inst)
    response = retrieve(http, inst, EXPLICIT)
    assert response.status_code == 406
    assert f"cannot be transcoded from '{J2K_LOSSLESS}' to '{EXPLICIT}'" in response.text
    frame = http.get(f"{inst.path()}/frames/1", headers={"Accept": "application/octet-stream"})
    assert frame.status_code == 406
    response = retrieve(http, inst, "*")
    assert response.status_code == 200
    assert response.content == inst.data


# -- frames of multi-frame files made by independent encoders ---------------------------------------------------------
FRAME_COUNT = 4
# (media type, transfer-syntax parameter or None for the media type's default, syntax sent)
FRAME_REQUESTS = [
    ("application/octet-stream", None, EXPLICIT),
    ("image/jp2", None, J2K_LOSSLESS),
    ("image/jp2", J2K, J2K),
    ("image/jpeg", None, JPEG_SV1),
    ("image/jpeg", JPEG_LOSSLESS, JPEG_LOSSLESS),
    ("image/jpeg", JPEG_BASELINE, JPEG_BASELINE),
    ("image/jls", None, JLS),
    ("image/jls", JLS_NEAR, JLS_NEAR),
    ("image/dicom-rle", None, RLE),
]


def _source(kind: str) -> Dataset:
    """A multi-frame explicit VR LE dataset of random pixels: 12-bit greyscale or 8-bit RGB."""
    rng = np.random.default_rng(11)
    if kind == "grey":
        ds = make_dataset(rows=40, columns=36, frames=FRAME_COUNT, BitsStored=12, HighBit=11)
        y, x = np.mgrid[0:40, 0:36]
        frames = np.array([x * 50 + y * 40 + f * 100 for f in range(FRAME_COUNT)])  # within 12 bits
        ds.PixelData = (frames + rng.integers(0, 16, frames.shape)).astype(np.uint16).tobytes()
        return ds
    ds = make_dataset(rows=34, columns=38, frames=FRAME_COUNT, SamplesPerPixel=3, PhotometricInterpretation="RGB")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    # smooth colour gradients plus a little noise: realistic for the lossy codecs' PSNR
    y, x = np.mgrid[0:34, 0:38]
    frames = [np.stack([x * 6 + f * 9, y * 7, (x + y) * 3], axis=-1) for f in range(FRAME_COUNT)]
    noisy = np.array(frames) + rng.integers(0, 4, (FRAME_COUNT, 34, 38, 3))
    ds.PixelData = np.clip(noisy, 0, 255).astype(np.uint8).tobytes()
    return ds


def _dcmtk(tool: str, option: str, source: Path, tmp: Path) -> Dataset:
    out = tmp / f"{source.stem}-{tool}{option}.dcm"
    subprocess.run([tool, *([option] if option else []), str(source), str(out)], check=True, capture_output=True)
    return pydicom.dcmread(out)


def _multiframe_files(tmp: Path) -> dict[str, Dataset]:
    files: dict[str, Dataset] = {}
    for kind in ("grey", "rgb"):
        ds = _source(kind)
        path = tmp / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[f"{kind}-native"] = pydicom.dcmread(path)
        for syntax, cr in ((J2K_LOSSLESS, None), (J2K, [8])):
            copy = pydicom.dcmread(path)
            copy.compress(syntax, generate_instance_uid=False, **({"j2k_cr": cr} if cr else {}))
            files[f"{kind}-pydicom-{syntax}"] = copy
        if DCMTK:
            tools = [
                ("dcmcjpeg", "+e1"),
                ("dcmcjpeg", "+el"),
                ("dcmcjpls", "+el"),
                ("dcmcjpls", "+en"),
                ("dcmcrle", ""),
            ]
            if kind == "rgb":
                tools.append(("dcmcjpeg", "+eb"))
            for tool, option in tools:
                made = _dcmtk(tool, option, path, tmp)
                files[f"{kind}-{tool}{option}-{made.file_meta.TransferSyntaxUID}"] = made
    return files


@pytest.fixture(scope="module")
def multiframe(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stored]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = _multiframe_files(tmp_path_factory.mktemp("multiframe"))
        instances = {}
        for name, ds in files.items():
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid(), new_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            instances[name] = stored(ds)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        store(client, *instances.values())
    return instances


def frame_codestream_pixels(codestream: bytes, like: Dataset, syntax: str) -> np.ndarray:
    """pydicom's decoding of one returned frame, described as the transcoded instance would describe it."""
    ds = Dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation"):
        ds[keyword] = like[keyword]
    ds.PhotometricInterpretation = expected_photometric(like, syntax)
    # native frames of a native source are its bytes, in its planar configuration; decoded frames are interleaved
    kept = not UID(syntax).is_compressed and not like.file_meta.TransferSyntaxUID.is_compressed
    ds.PlanarConfiguration = like.get("PlanarConfiguration", 0) if kept else 0
    ds.NumberOfFrames = 1
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    if UID(syntax).is_compressed:
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = codestream
    return ds.pixel_array


def assert_frame(data: bytes, content_type: str, inst: Stored, n: int, media: str, syntax: str) -> None:
    assert_media(content_type, media, syntax)
    source = inst.ds
    if syntax == source.file_meta.TransferSyntaxUID:
        count = int(source.get("NumberOfFrames", 1) or 1)
        if UID(syntax).is_compressed:
            assert data == list(generate_frames(source.PixelData, number_of_frames=count))[n - 1]
        else:
            size = len(source.PixelData) // count
            assert data == source.PixelData[(n - 1) * size : n * size]
        return
    expected = _decoded(source, index=n - 1)
    lossy = syntax in LOSSY
    assert_same_pixels(frame_codestream_pixels(data, source, syntax), expected, lossy, (inst.transfer_syntax, syntax))


@pytest.mark.parametrize(("media", "param", "syntax"), FRAME_REQUESTS)
def test_frames_in_every_media_type(http, multiframe, media, param, syntax):
    accept = f"{media}; transfer-syntax={param}" if param else media
    for name, inst in multiframe.items():
        if not encodable(inst.ds, syntax):
            response = http.get(f"{inst.path()}/frames/2", headers={"Accept": accept})
            assert response.status_code == 406, (name, accept)
            continue
        response = http.get(f"{inst.path()}/frames/2", headers={"Accept": accept})
        assert response.status_code == 200, (name, accept, response.text)
        assert_frame(response.content, response.headers["content-type"], inst, 2, media, syntax)
        response = http.get(
            f"{inst.path()}/frames/4,1",
            headers={"Accept": f'multipart/related; type="{media}"' + (f"; transfer-syntax={param}" if param else "")},
        )
        assert response.status_code == 200, (name, accept, response.text)
        parts = parse_multipart(response)
        assert len(parts) == 2
        for part, n in zip(parts, (4, 1), strict=True):
            assert_frame(part.data, part.content_type, inst, n, media, syntax)


def test_frames_as_stored_need_no_decoding(http, multiframe):
    """`*` (and the stored syntax named) give the stored fragments, whatever the syntax."""
    for name, inst in multiframe.items():
        syntax = inst.transfer_syntax
        frames = (
            list(generate_frames(inst.ds.PixelData, number_of_frames=FRAME_COUNT))
            if UID(syntax).is_compressed
            else None
        )
        response = http.get(f"{inst.path()}/frames/3", headers={"Accept": "*/*"})
        assert response.status_code == 200, name
        [part] = parse_multipart(response)
        assert_media(part.content_type, "application/octet-stream", syntax)
        if frames is not None:
            assert part.data == frames[2], name


# -- limits -------------------------------------------------------------------------------------------------------
def test_huge_declared_image_is_refused_before_decoding(http):
    """A few bytes declaring 60000 x 60000 pixels x 1000 frames: 406, with no attempt to allocate them."""
    ds = make_dataset()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000
    ds.file_meta.TransferSyntaxUID = UID(J2K_LOSSLESS)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(40)] * 2)
    ds["PixelData"].is_undefined_length = True
    inst = stored(ds)
    store(http, inst)
    response = retrieve(http, inst, EXPLICIT)
    assert response.status_code == 406
    assert "Decoding the pixel data would need" in response.text
    response = http.get(f"{inst.path()}/frames/1", headers={"Accept": "application/octet-stream"})
    assert response.status_code == 406
    assert "Decoding the pixel data would need" in response.text
    response = http.get(f"{inst.path()}/frames/1", headers={"Accept": "*/*"})
    assert response.status_code == 200  # as stored: nothing to decode


@pytest.fixture(scope="module")
def small_decode_server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("dicomhub-decode"), max_decoded_size="10000").start()
    yield srv
    srv.stop()


def test_decode_limit_counts_only_the_requested_frames(small_decode_server):
    """10 frames of 64x64x16 bits (8 KB each, 80 KB in all) under a 10 KB limit: one frame decodes, the instance
    does not."""
    ds = make_dataset(rows=64, columns=64, frames=10)
    ds.compress(RLE, generate_instance_uid=False)
    inst = stored(ds)
    with httpx.Client(base_url=small_decode_server.url, timeout=60) as http:
        store(http, inst)
        response = http.get(f"{inst.path()}/frames/7", headers={"Accept": "application/octet-stream"})
        assert response.status_code == 200
        assert response.content == pixel_array(inst.ds, index=6).tobytes()
        response = http.get(
            f"{inst.path()}/frames/1,2", headers={"Accept": 'multipart/related; type="application/octet-stream"'}
        )
        assert response.status_code == 406
        response = retrieve(http, inst, EXPLICIT)
        assert response.status_code == 406
        assert "above the supported limit of 10000" in response.text
