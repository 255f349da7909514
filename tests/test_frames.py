"""WADO-RS frames: native and encapsulated pixel data, single part and multipart, Accept negotiation, errors."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array

from tests.factory import make_rgb_samples
from tests.servers import Server
from tests.test_wado import (
    BIG,
    DEFLATED,
    EXPLICIT,
    IMPLICIT,
    J2K,
    J2K_LOSSLESS,
    JPEG_BASELINE,
    Stored,
    assert_media,
    generated,
    get_without_accept,
    parse_multipart,
    pydicom_file,
    reuid,
    split_media_type,
    store,
    stored,
)

OCTET = "application/octet-stream"
MULTI_OCTET = 'multipart/related; type="application/octet-stream"'
SINGLE_FRAME_ONLY = "The accept header is supported for single frame retrieval, use multi-part accept header instead."
RTDOSE_FRAME = 10 * 10 * 4  # 10x10 pixels, 32 bits


@dataclass
class FramesFixture:
    rtdose: Stored  # 15 native frames, implicit VR LE
    ybr: Stored  # 30 JPEG baseline frames, one fragment each
    rle: Stored  # 2 RLE frames
    big: Stored  # MR_small big endian, 1 frame
    j2k: Stored  # JPEG2000.dcm: lossy J2K, NumberOfFrames 1
    j2k_lossless: Stored  # MR_small J2K lossless
    deflated: Stored  # image_dfl.dcm
    liver: Stored  # 1-bit segmentation
    sr: Stored  # no pixel data
    no_pixels: Stored  # image attributes but no Pixel Data element


@pytest.fixture(scope="module")
def data(server: Server) -> FramesFixture:
    fixture = FramesFixture(
        rtdose=reuid(pydicom_file("rtdose.dcm")),
        ybr=reuid(pydicom_file("examples_ybr_color.dcm")),
        rle=reuid(pydicom_file("SC_rgb_rle_2frame.dcm")),
        big=reuid(pydicom_file("MR_small_bigendian.dcm")),
        j2k=reuid(pydicom_file("JPEG2000.dcm")),
        j2k_lossless=reuid(pydicom_file("MR_small_jp2klossless.dcm")),
        deflated=reuid(pydicom_file("image_dfl.dcm")),
        liver=reuid(pydicom_file("liver_1frame.dcm")),
        sr=reuid(pydicom_file("test-SR.dcm")),
        no_pixels=generated(PixelData=None),
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        store(client, *vars(fixture).values())
    return fixture


@pytest.fixture
def dicomweb(server: Server) -> DICOMwebClient:
    return DICOMwebClient(url=f"{server.url}/v2")


def frames_url(inst: Stored, frames: str) -> str:
    return f"{inst.path()}/frames/{frames}"


def native_frame(inst: Stored, n: int, size: int) -> bytes:
    return inst.ds.PixelData[(n - 1) * size : n * size]


def reencapsulated(inst: Stored, frame: bytes, syntax: str) -> bytes:
    """``inst`` as a Part-10 file with ``frame`` as its only frame, in ``syntax``: to decode a returned frame."""
    ds = pydicom.dcmread(io.BytesIO(inst.data))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = 1
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def encapsulated_frames(inst: Stored) -> list[bytes]:
    return list(generate_frames(inst.ds.PixelData, number_of_frames=int(inst.ds.get("NumberOfFrames", 1))))


# -- native multi-frame ------------------------------------------------------------------------------------------
def test_native_single_frame_single_part(http, data):
    for n in (1, 8, 15):
        response = http.get(frames_url(data.rtdose, str(n)), headers={"Accept": OCTET})
        assert response.status_code == 200, response.text
        # stored implicit VR LE: the same bytes are explicit VR LE pixel data, so no transcoding is involved
        assert_media(response.headers["content-type"], OCTET, EXPLICIT)
        assert response.content == native_frame(data.rtdose, n, RTDOSE_FRAME)
        assert len(response.content) == RTDOSE_FRAME


@pytest.mark.parametrize(
    ("accept", "syntax"),
    [
        (f"{MULTI_OCTET}; transfer-syntax=*", IMPLICIT),
        ("*/*", IMPLICIT),
        (MULTI_OCTET, EXPLICIT),
        (f"{MULTI_OCTET}; transfer-syntax={EXPLICIT}", EXPLICIT),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", IMPLICIT),
        ('multipart/related; type="application/octet-stream"; transfer-syntax="*"', IMPLICIT),
        ("multipart/related; transfer-syntax=*", IMPLICIT),
        ("image/png, */*;q=0.5", IMPLICIT),
        (f"{OCTET}; q=0.9, {MULTI_OCTET}; transfer-syntax=*", IMPLICIT),
        (f"{MULTI_OCTET}, {MULTI_OCTET}; transfer-syntax=*", IMPLICIT),
    ],
)
def test_native_frames_multipart(http, data, accept, syntax):
    response = http.get(frames_url(data.rtdose, "1,3,15"), headers={"Accept": accept})
    assert response.status_code == 200, (accept, response.status_code, response.text)
    parts = parse_multipart(response)
    assert [p.data for p in parts] == [native_frame(data.rtdose, n, RTDOSE_FRAME) for n in (1, 3, 15)]
    for part in parts:
        assert_media(part.content_type, OCTET, syntax)


def test_frames_come_in_the_requested_order(http, data):
    response = http.get(frames_url(data.rtdose, "15,2,7"), headers={"Accept": "*/*"})
    parts = parse_multipart(response)
    assert [p.data for p in parts] == [native_frame(data.rtdose, n, RTDOSE_FRAME) for n in (15, 2, 7)]


def test_all_native_frames_make_up_the_pixel_data(http, data):
    frames = ",".join(str(n) for n in range(1, 16))
    parts = parse_multipart(http.get(frames_url(data.rtdose, frames), headers={"Accept": "*/*"}))
    assert b"".join(p.data for p in parts) == data.rtdose.ds.PixelData
    assert len(data.rtdose.ds.PixelData) == 15 * RTDOSE_FRAME


def test_native_frames_with_dicomweb_client(dicomweb, data):
    inst = data.rtdose
    frames = dicomweb.retrieve_instance_frames(inst.study, inst.series, inst.sop, [1, 3, 15])
    assert frames == [native_frame(inst, n, RTDOSE_FRAME) for n in (1, 3, 15)]
    decoded = [np.frombuffer(f, dtype="<u4").reshape(10, 10) for f in frames]
    for got, n in zip(decoded, (1, 3, 15), strict=True):
        assert np.array_equal(got, inst.ds.pixel_array[n - 1])


# -- encapsulated ------------------------------------------------------------------------------------------------
def test_encapsulated_frames_are_the_fragments(http, data):
    expected = encapsulated_frames(data.ybr)
    assert len(expected) == 30
    response = http.get(frames_url(data.ybr, "1,15,30"), headers={"Accept": f"{MULTI_OCTET}; transfer-syntax=*"})
    assert response.status_code == 200, response.text
    parts = parse_multipart(response)
    assert [p.data for p in parts] == [expected[0], expected[14], expected[29]]
    for part in parts:
        assert_media(part.content_type, OCTET, JPEG_BASELINE)
        assert part.data[:2] == b"\xff\xd8"

    single = http.get(frames_url(data.ybr, "2"), headers={"Accept": f"{OCTET}; transfer-syntax=*"})
    assert single.status_code == 200
    assert_media(single.headers["content-type"], OCTET, JPEG_BASELINE)
    assert single.content == expected[1]


def test_encapsulated_frames_with_dicomweb_client(dicomweb, data):
    inst = data.ybr
    frames = dicomweb.retrieve_instance_frames(inst.study, inst.series, inst.sop, [30, 1], media_types=((OCTET, "*"),))
    expected = encapsulated_frames(inst)
    assert frames == [expected[29], expected[0]]


def test_rle_frames(http, data):
    expected = encapsulated_frames(data.rle)
    parts = parse_multipart(http.get(frames_url(data.rle, "1,2"), headers={"Accept": "*/*"}))
    assert [p.data for p in parts] == expected
    assert_media(parts[0].content_type, OCTET, "1.2.840.10008.1.2.5")


def test_encapsulated_single_frame_with_number_of_frames(http, data):
    [expected] = encapsulated_frames(data.j2k)
    response = http.get(frames_url(data.j2k, "1"), headers={"Accept": "*/*"})
    [part] = parse_multipart(response)
    assert part.data == expected
    assert_media(part.content_type, OCTET, J2K)
    assert http.get(frames_url(data.j2k, "2"), headers={"Accept": "*/*"}).status_code == 404


@pytest.mark.parametrize("accept", [OCTET, MULTI_OCTET, f"{MULTI_OCTET}; transfer-syntax={EXPLICIT}"])
def test_encapsulated_frames_are_decoded_when_asked(http, data, accept):
    """Explicit VR LE (the octet-stream default) decodes only the requested frame: JPEG's YCbCr comes back as RGB."""
    expected = pixel_array(data.ybr.ds, index=4, decoding_plugin="pylibjpeg")
    response = http.get(frames_url(data.ybr, "5"), headers={"Accept": accept})
    assert response.status_code == 200, (accept, response.text)
    if accept == OCTET:
        content_type, payload = response.headers["content-type"], response.content
    else:
        [part] = parse_multipart(response)
        content_type, payload = part.content_type, part.data
    assert_media(content_type, OCTET, EXPLICIT)
    assert payload == expected.tobytes()


def test_jp2_frames_of_a_j2k_lossless_instance(http, data):
    [expected] = encapsulated_frames(data.j2k_lossless)
    response = http.get(frames_url(data.j2k_lossless, "1"), headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert response.status_code == 200, response.text
    [part] = parse_multipart(response)
    assert_media(part.content_type, "image/jp2", J2K_LOSSLESS)
    assert part.data == expected
    # the lossy J2K instance is re-encoded losslessly: its decoded pixels are kept
    response = http.get(frames_url(data.j2k, "1"), headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert response.status_code == 200
    [part] = parse_multipart(response)
    assert_media(part.content_type, "image/jp2", J2K_LOSSLESS)
    assert part.data != encapsulated_frames(data.j2k)[0]
    decoded = pixel_array(io.BytesIO(reencapsulated(data.j2k, part.data, J2K_LOSSLESS)))
    assert np.array_equal(decoded, data.j2k.ds.pixel_array)


# -- byte order, deflate, bit packing -----------------------------------------------------------------------------
def test_big_endian_frames_are_swapped_to_little_endian(http, data):
    reference = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    response = http.get(frames_url(data.big, "1"), headers={"Accept": OCTET})
    assert response.status_code == 200, response.text
    assert_media(response.headers["content-type"], OCTET, EXPLICIT)
    assert response.content == reference.PixelData
    assert np.array_equal(np.frombuffer(response.content, "<i2").reshape(64, 64), reference.pixel_array)

    original = http.get(frames_url(data.big, "1"), headers={"Accept": f"{OCTET}; transfer-syntax=*"})
    assert original.status_code == 200
    assert_media(original.headers["content-type"], OCTET, BIG)
    assert original.content == data.big.ds.PixelData
    assert original.content == np.frombuffer(reference.PixelData, "<u2").byteswap().tobytes()


def test_deflated_frames_are_the_inflated_pixels(http, data):
    expected = data.deflated.ds.PixelData
    assert len(expected) == 512 * 512
    for accept, syntax in ((OCTET, EXPLICIT), (f"{OCTET}; transfer-syntax=*", DEFLATED)):
        response = http.get(frames_url(data.deflated, "1"), headers={"Accept": accept})
        assert response.status_code == 200, (accept, response.text)
        assert_media(response.headers["content-type"], OCTET, syntax)
        assert response.content == expected


def test_bit_packed_frame(http, data):
    response = http.get(frames_url(data.liver, "1"), headers={"Accept": OCTET})
    assert response.status_code == 200, response.text
    assert len(response.content) == 512 * 512 // 8
    assert response.content == data.liver.ds.PixelData[: 512 * 512 // 8]


def test_bit_packed_frames_that_do_not_start_on_a_byte(http):
    """5x5 1-bit frames are 25 bits each: every frame comes back repacked on its own (4 bytes, LSB first)."""
    bits = np.random.default_rng(7).integers(0, 2, 75, dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little").tobytes()
    inst = generated(
        rows=5,
        columns=5,
        frames=3,
        BitsAllocated=1,
        BitsStored=1,
        HighBit=0,
        PixelData=packed + b"\0" * (len(packed) % 2),
    )
    store(http, inst)
    parts = parse_multipart(http.get(frames_url(inst, "1,2,3"), headers={"Accept": MULTI_OCTET}))
    expected = [np.packbits(bits[i * 25 : (i + 1) * 25], bitorder="little").tobytes() for i in range(3)]
    assert [p.data for p in parts] == expected
    for i, part in enumerate(parts):
        unpacked = np.unpackbits(np.frombuffer(part.data, np.uint8), bitorder="little")[:25].reshape(5, 5)
        assert np.array_equal(unpacked, inst.ds.pixel_array[i])


def encapsulated_instance(frames: list[bytes], fragments_per_frame: int, bot: bytes | None) -> Stored:
    """A JPEG baseline instance with hand-made encapsulated pixel data (the server never decodes it)."""
    items = [b"\xfe\xff\x00\xe0" + struct.pack("<I", len(bot or b"")) + (bot or b"")]
    for frame in frames:
        size = len(frame) // fragments_per_frame
        for i in range(fragments_per_frame):
            fragment = frame[i * size : (i + 1) * size if i < fragments_per_frame - 1 else None]
            items.append(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(fragment)) + fragment)
    items.append(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return generated(
        rows=8,
        columns=8,
        frames=len(frames),
        transfer_syntax=JPEG_BASELINE,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelData=b"".join(items),
    )


def fake_jpeg(n: int) -> bytes:
    return b"\xff\xd8" + bytes([n]) * (20 + 2 * n) + b"\xff\xd9"


@pytest.mark.parametrize(
    ("fragments_per_frame", "bot"),
    [
        (2, "valid"),  # basic offset table groups the fragments
        (2, None),  # no offset table: a fragment opening a JPEG codestream starts a frame
        (1, b"\x00" * 6),  # malformed offset table (not a multiple of 4): one fragment per frame
        (3, "valid"),
    ],
)
def test_encapsulated_frame_grouping(http, fragments_per_frame, bot):
    frames = [fake_jpeg(n) for n in range(1, 4)]
    offsets = None
    if bot == "valid":
        offsets, position = [], 0
        for frame in frames:
            offsets.append(position)
            size = len(frame) // fragments_per_frame
            sizes = [size] * (fragments_per_frame - 1) + [len(frame) - size * (fragments_per_frame - 1)]
            position += sum(8 + s for s in sizes)
        bot = struct.pack(f"<{len(offsets)}I", *offsets)
    inst = encapsulated_instance(frames, fragments_per_frame, bot)
    store(http, inst)
    response = http.get(frames_url(inst, "3,1,2"), headers={"Accept": "*/*"})
    assert response.status_code == 200, response.text
    assert [p.data for p in parse_multipart(response)] == [frames[2], frames[0], frames[1]]


def test_azure_samples_frame_is_the_pixels_without_padding(http, dicomweb):
    samples = [stored(ds) for ds in make_rgb_samples()]
    store(http, *samples)
    for inst in samples:
        assert len(inst.ds.PixelData) == 2_892_946  # even length: one pad byte
        expected = inst.ds.PixelData[:2_892_945]
        response = http.get(frames_url(inst, "1"), headers={"Accept": OCTET})
        assert response.status_code == 200
        assert len(response.content) == 2_892_945
        assert response.content == expected
        [frame] = dicomweb.retrieve_instance_frames(inst.study, inst.series, inst.sop, [1])
        assert frame == expected
        rgb = np.frombuffer(frame, np.uint8).reshape(979, 985, 3)
        assert np.array_equal(rgb, inst.ds.pixel_array)
    assert http.get(frames_url(samples[0], "2"), headers={"Accept": OCTET}).status_code == 404


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", ["0", "-1", "abc", "1,0", "1,,2", "1.5", "1,-3", "%20"])
def test_invalid_frame_numbers(http, data, frames):
    response = http.get(frames_url(data.rtdose, frames), headers={"Accept": "*/*"})
    assert response.status_code == 400, (frames, response.status_code)
    assert response.text


@pytest.mark.parametrize("frames", ["16", "1,16", "100"])
def test_frame_beyond_number_of_frames(http, data, frames):
    response = http.get(frames_url(data.rtdose, frames), headers={"Accept": "*/*"})
    assert response.status_code == 404
    assert "frame" in response.text.lower()
    response = http.get(frames_url(data.ybr, "31"), headers={"Accept": "*/*"})
    assert response.status_code == 404


def test_instance_without_pixel_data(http, data):
    for inst in (data.sr, data.no_pixels):
        for accept in ("*/*", OCTET):
            response = http.get(frames_url(inst, "1"), headers={"Accept": accept})
            assert response.status_code == 404, (inst.sop, accept, response.status_code, response.text)
            assert "frame" in response.text.lower()


def test_single_part_accept_with_several_frames(http, data):
    for accept in (OCTET, f"{OCTET}; transfer-syntax=*"):
        response = http.get(frames_url(data.rtdose, "1,2"), headers={"Accept": accept})
        assert response.status_code == 400
        assert response.text == SINGLE_FRAME_ONLY


@pytest.mark.parametrize(
    "accept",
    [
        "application/dicom",
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "image/png",
        f"image/jpeg; transfer-syntax={EXPLICIT}",
        f'multipart/related; type="image/jp2"; transfer-syntax={JPEG_BASELINE}',
        'multipart/related; type="image/jp2"; transfer-syntax=*',
        f"{OCTET}; transfer-syntax={IMPLICIT}",
        f"{MULTI_OCTET}; transfer-syntax=garbage",
        f"{MULTI_OCTET}; transfer-syntax=1.2.840.10008.1.2.4.100",
        "image/jp2",  # 32-bit pixels: JPEG 2000 cannot hold them
        "*/*; q=0",
    ],
)
def test_frames_not_acceptable(http, data, accept):
    response = http.get(frames_url(data.rtdose, "1"), headers={"Accept": accept})
    assert response.status_code == 406, (accept, response.status_code)


def test_frames_without_accept(http, data):
    assert get_without_accept(http, frames_url(data.rtdose, "1")).status_code == 406


def test_frames_of_unknown_or_invalid_instance(http, data):
    inst = data.rtdose
    unknown = f"/v2/studies/{inst.study}/series/{inst.series}/instances/1.2.3.4.5/frames/1"
    response = http.get(unknown, headers={"Accept": "*/*"})
    assert response.status_code == 404
    assert "instance" in response.text
    invalid = f"/v2/studies/{inst.study}/series/{inst.series}/instances/not-a-uid/frames/1"
    assert http.get(invalid, headers={"Accept": "*/*"}).status_code == 400
    wrong_series = f"/v2/studies/{inst.study}/series/{data.ybr.series}/instances/{inst.sop}/frames/1"
    assert http.get(wrong_series, headers={"Accept": "*/*"}).status_code == 404


def test_single_frame_content_type_and_length(http, data):
    response = http.get(frames_url(data.rtdose, "4"), headers={"Accept": f"{OCTET}; transfer-syntax=*"})
    assert response.status_code == 200
    media, params = split_media_type(response.headers["content-type"])
    assert (media, params["transfer-syntax"]) == (OCTET, IMPLICIT)
    assert response.content == native_frame(data.rtdose, 4, RTDOSE_FRAME)
