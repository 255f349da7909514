"""Transcoding between transfer syntaxes, of whole files and of single frames.

Between the native syntaxes (explicit/implicit VR little endian, explicit VR big endian, deflated) only the encoding
changes: no pixel decoding. Byte order of binary values follows pydicom's reading of them, so that what we write
decodes to the same pixels: Pixel Data of 16 bits or more swaps in units of Bits Allocated, 8-bit Pixel Data encoded
as OW swaps in 16-bit words (PS3.5 OW rule), 1-bit and OB data never swap; other OW/OF/OL/OD/OV values swap in units
of their VR.

Anything else decodes frame by frame with pydicom's decoders (pylibjpeg, pyjpegls, gdcm plugins) and encodes each
frame with a codec library: pydicom's encoders (RLE, JPEG-LS, JPEG 2000), GDCM (JPEG lossless) and Pillow (JPEG
baseline). Colour: JPEG's own YCbCr is undone by decoding (the result is RGB, as its Photometric Interpretation then
says); other YBR data stays YBR_FULL, so lossless targets keep the stored values exactly. HTJ2K has no encoder in
the codec libraries we use (OpenJPEG 2.5 decodes it only), so it is a source, never a target.

Callers check sizes and take a decode slot first (domain/decoding.py); codec failures raise :class:`TranscodeError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.pixels import convert_color_space, get_decoder, get_encoder, pack_bits
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicomhub.dicom.frames import image_attribute
from dicomhub.dicom.validation import pydicom_error

UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})
# Syntaxes whose Pixel Data is native (not encapsulated) once the dataset is read
NATIVE = UNCOMPRESSED | {DeflatedExplicitVRLittleEndian}
# Encapsulated syntaxes we can produce, and the ones among them that lose information (only made when asked for)
ENCODABLE = frozenset(
    {
        RLELossless,
        JPEGBaseline8Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
    }
)
LOSSY = frozenset({JPEGBaseline8Bit, JPEGLSNearLossless, JPEG2000})
TARGETS = NATIVE | ENCODABLE
# Syntaxes a client may name: the targets, and HTJ2K (served as stored only)
KNOWN = TARGETS | {HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}

# Lossy settings: visually lossless quality, as a client asking for a lossy syntax expects smaller, not worse, images
JPEG_QUALITY = 90
JPEG_LS_NEAR = 2  # largest error of any sample
J2K_RATIO = 10.0
_LOSSY_METHOD = {JPEGBaseline8Bit: "ISO_10918_1", JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1"}
# Syntaxes whose codestream carries its own colour transform: decoding gives RGB
_CODEC_YCBCR = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
_GDCM_JPEG = {JPEGLossless: "JPEGLosslessProcess14", JPEGLosslessSV1: "JPEGLosslessProcess14_1"}
# One codec plugin per syntax (pylibjpeg unless named here): pydicom would otherwise try each available one, GDCM
# first, and GDCM ends the whole process (an uncaught C++ exception) on some inputs. GDCM only encodes JPEG lossless,
# from arrays we checked, and decodes JPEG Extended through its IJG codecs (jpeg_extended.py: 12-bit samples, and
# the scan parameters of older encoders that libjpeg refuses).
_GDCM_IJG = "gdcm-ijg"
_PLUGIN = {
    RLELossless: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEGExtended12Bit: _GDCM_IJG,
}
if _GDCM_IJG not in get_decoder(JPEGExtended12Bit).available_plugins:
    get_decoder(JPEGExtended12Bit).add_plugin(_GDCM_IJG, ("dicomhub.dicom.jpeg_extended", "decode_frame"))
_IMAGE_PIXEL = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
)
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


class TranscodeError(Exception):
    """The pixel data could not be decoded or encoded in the requested syntax (406 for the client)."""


def can_decode(syntax: str) -> bool:
    if syntax in NATIVE:
        return True
    try:
        return get_decoder(UID(syntax)).is_available
    except NotImplementedError:
        return False


def can_transcode(source: str, target: str) -> bool:
    return source == target or (target in TARGETS and can_decode(source))


def needs_pixel_decoding(source: str, target: str) -> bool:
    return source != target and not (source in NATIVE and target in NATIVE)


# -- byte order of native data -----------------------------------------------------------------------------------
def pixel_swap_width(bits_allocated: int, vr: str) -> int:
    """Bytes per swapped unit of native Pixel Data between little and big endian; 1 = no swap."""
    if bits_allocated >= 16:
        return bits_allocated // 8
    if bits_allocated == 8 and "OW" in vr:
        return 2
    return 1


def swap_bytes(raw: bytes, width: int) -> bytes:
    """Reverses the byte order of each ``width``-byte unit; a trailing partial unit is left as is."""
    if width <= 1 or not raw:
        return raw
    usable = len(raw) - len(raw) % width
    return np.frombuffer(raw[:usable], dtype=f"u{width}").byteswap().tobytes() + raw[usable:]


def _element_swap_width(elem: DataElement, ds: Dataset) -> int:
    if not isinstance(elem.value, bytes | bytearray):
        return 1  # decoded values (numbers, strings) are re-encoded by the writer
    if int(elem.tag) == _PIXEL_DATA:
        if elem.is_undefined_length:
            return 1  # encapsulated fragments are byte streams
        return pixel_swap_width(image_attribute(ds, "BitsAllocated", 16), elem.VR)
    if elem.VR in _SWAP_WIDTH:
        return _SWAP_WIDTH[elem.VR]
    if "OW" in elem.VR:  # an ambiguous VR such as 'US or OW' still holding raw bytes
        return 2
    return 1


def _swap_binary_values(ds: Dataset) -> None:
    """Byte-swaps raw binary values (OW, OF, ...) in place; pydicom leaves that to the caller."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_binary_values(item)
            continue
        width = _element_swap_width(elem, ds)
        if width > 1:
            elem.value = swap_bytes(bytes(elem.value), width)


def little_endian_pixel_data(ds: Dataset, source: str) -> bytes:
    """The native Pixel Data value of ``ds`` (read from a file in ``source``) in little-endian byte order."""
    raw = ds.PixelData
    if UID(source).is_little_endian:
        return raw
    return swap_bytes(raw, pixel_swap_width(image_attribute(ds, "BitsAllocated", 16), ds["PixelData"].VR))


# -- whole files ---------------------------------------------------------------------------------------------------
def transcode(ds: Dataset, target: str) -> bytes:
    """``ds`` (a Part-10 file as read, pixel data included) re-encoded in ``target``: the file meta transfer syntax,
    and where pixels were decoded the image pixel description (Photometric Interpretation, lossy compression
    attributes), change; everything else stays."""
    source = UID(ds.file_meta.TransferSyntaxUID)
    dst = UID(target)
    try:
        if needs_pixel_decoding(source, dst) and "PixelData" in ds:
            if dst in NATIVE:
                _decompress(ds)
            else:
                _compress(ds, dst)
        # Encapsulated sources are little endian, and so is Pixel Data decoded from them: one rule for every value
        if source.is_little_endian != dst.is_little_endian:
            _swap_binary_values(ds)
        ds.file_meta.TransferSyntaxUID = dst
        out = io.BytesIO()
        dcmwrite(out, ds, implicit_vr=dst.is_implicit_VR, little_endian=dst.is_little_endian, force_encoding=True)
    except TranscodeError:
        raise
    except Exception as exc:  # codecs, and pydicom on values it cannot decode (an unknown VR, a wrong length)
        raise TranscodeError(pydicom_error(exc)) from exc
    return out.getvalue()


def decoding_plugin(syntax: str) -> str:
    """The one pydicom decoding plugin used for ``syntax`` ("" for native data, which needs none)."""
    return "" if syntax in NATIVE else _PLUGIN.get(UID(syntax), "pylibjpeg")


def assumed_pixel_options(ds: Dataset) -> dict[str, Any]:
    """Decoding options for the Image Pixel attributes ``ds`` leaves out or empty, with the values viewers assume
    (DCMTK, Orthanc): pydicom refuses to decode without them. Only the decoding sees them; the file is not changed."""

    def absent(keyword: str) -> bool:
        return ds.get(keyword) in (None, "")

    options: dict[str, Any] = {}
    samples = 1 if absent("SamplesPerPixel") else int(ds.SamplesPerPixel)
    if absent("SamplesPerPixel"):
        options["samples_per_pixel"] = 1
    if absent("PhotometricInterpretation") and samples == 1:
        options["photometric_interpretation"] = "MONOCHROME2"
    if absent("PixelRepresentation"):
        options["pixel_representation"] = 0  # unsigned
    if absent("PlanarConfiguration") and samples > 1:
        options["planar_configuration"] = 0  # colour-by-pixel
    if absent("BitsStored") and not absent("BitsAllocated"):
        options["bits_stored"] = int(ds.BitsAllocated)
    return options


def _decoded_frames(ds: Dataset) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Each frame of ``ds`` decoded, with pydicom's description of the decoded values (their colour space)."""
    source = UID(ds.file_meta.TransferSyntaxUID)
    yield from get_decoder(source).iter_array(
        ds, as_rgb=source in _CODEC_YCBCR, decoding_plugin=decoding_plugin(source), **assumed_pixel_options(ds)
    )


def _set_image_pixel(ds: Dataset, info: dict[str, Any]) -> None:
    ds.PhotometricInterpretation = info["photometric_interpretation"]
    if int(info["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = 0
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)


def _decompress(ds: Dataset) -> None:
    """Replaces encapsulated Pixel Data by its decoded frames, little endian (the dataset is then explicit VR LE)."""
    info: dict[str, Any] = {}
    frames = []
    for arr, info in _decoded_frames(ds):
        frames.append(native_bytes(arr, info))
    value = b"".join(frames)
    if len(value) % 2:
        value += b"\0"
    _set_image_pixel(ds, info)
    ds["PixelData"] = DataElement(_PIXEL_DATA, "OB" if int(ds.BitsAllocated) <= 8 else "OW", value)


def _compress(ds: Dataset, target: UID) -> None:
    """Replaces Pixel Data by the frames encoded in ``target`` (basic offset table); lossy targets record it."""
    encoded: list[bytes] = []
    info: dict[str, Any] = {}
    photometric = ""
    raw_size = 0
    for arr, info in _decoded_frames(ds):
        raw_size += arr.nbytes
        frame, photometric = encode_frame(arr, info, target)
        encoded.append(frame)
    _set_image_pixel(ds, {**info, "photometric_interpretation": photometric})  # samples as decoded (maybe assumed)
    ds["PixelData"] = DataElement(_PIXEL_DATA, "OB", encapsulate(encoded, has_bot=True), is_undefined_length=True)
    if target in LOSSY:
        _record_lossy(ds, target, raw_size / max(1, sum(len(f) for f in encoded)))


def _record_lossy(ds: Dataset, target: UID, ratio: float) -> None:
    """PS3.3 C.7.6.1.1.5: a lossy step is recorded, appended to any earlier ones."""

    def values(keyword: str) -> list:
        value = ds.get(keyword)
        if value is None or value == "":
            return []
        return list(value) if isinstance(value, MultiValue) else [value]

    ratios = [str(v) for v in values("LossyImageCompressionRatio")]
    methods = values("LossyImageCompressionMethod")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"]
    ds.LossyImageCompressionMethod = [*methods, _LOSSY_METHOD[target]]


# -- single frames -------------------------------------------------------------------------------------------------
def transcode_frame(header: Dataset, frame: bytes, source: str, target: str) -> bytes:
    """One frame's bytes in ``target``: ``frame`` is the frame's codestream (encapsulated ``source``) or its native
    little-endian pixel bytes; ``header`` has the image pixel attributes. Only this frame is decoded."""
    single = Dataset()
    for keyword in _IMAGE_PIXEL:
        if keyword in header:
            single[keyword] = header[keyword]
    single.file_meta = FileMetaDataset()
    encapsulated = source not in NATIVE
    single.file_meta.TransferSyntaxUID = UID(source) if encapsulated else ExplicitVRLittleEndian
    single.PixelData = encapsulate([frame]) if encapsulated else frame
    single["PixelData"].is_undefined_length = encapsulated
    try:
        arr, info = next(_decoded_frames(single))
        if target in NATIVE:
            return native_bytes(arr, info)
        return encode_frame(arr, info, UID(target))[0]
    except Exception as exc:  # codecs raise anything from ValueError to RuntimeError on data they cannot handle
        raise TranscodeError(str(exc)) from exc


def native_bytes(arr: np.ndarray, info: dict[str, Any]) -> bytes:
    """A decoded frame as native Pixel Data bytes: little endian, pixel-interleaved, 1-bit data packed."""
    if int(info["bits_allocated"]) == 1:
        return pack_bits(arr, pad=False)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def encode_frame(arr: np.ndarray, info: dict[str, Any], target: UID) -> tuple[bytes, str]:
    """(codestream, Photometric Interpretation of what it decodes to) of one decoded frame."""
    if target == JPEGBaseline8Bit:
        return _jpeg_baseline(arr, info)
    options = {
        "rows": info["rows"],
        "columns": info["columns"],
        "samples_per_pixel": info["samples_per_pixel"],
        "bits_allocated": info["bits_allocated"],
        "bits_stored": info["bits_stored"],
        "pixel_representation": info["pixel_representation"],
        "photometric_interpretation": info["photometric_interpretation"],
        "number_of_frames": 1,
        "planar_configuration": 0,
    }
    if target in _GDCM_JPEG:
        return _gdcm_jpeg_lossless(arr, options, target), str(info["photometric_interpretation"])
    if target == JPEGLSNearLossless:
        options["jls_error"] = JPEG_LS_NEAR
    if target == JPEG2000:
        options["j2k_cr"] = [J2K_RATIO]
    encoded = get_encoder(target).encode(arr, encoding_plugin=_PLUGIN.get(target, "pylibjpeg"), **options)
    return bytes(encoded), str(info["photometric_interpretation"])


def _jpeg_baseline(arr: np.ndarray, info: dict[str, Any]) -> tuple[bytes, str]:
    """8-bit JPEG with Pillow: greyscale as is, colour as YCbCr 4:2:2 (PS3.5 8.2.1: YBR_FULL_422)."""
    photometric = str(info["photometric_interpretation"])
    if int(info["bits_allocated"]) != 8 or int(info["pixel_representation"]) != 0 or int(info["bits_stored"]) != 8:
        raise TranscodeError("JPEG Baseline holds unsigned 8-bit samples only.")
    out = io.BytesIO()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        Image.fromarray(arr, mode="L").save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), photometric
    if photometric not in ("RGB", "YBR_FULL"):
        raise TranscodeError(f"JPEG Baseline cannot encode {photometric} pixel data.")
    rgb = arr if photometric == "RGB" else convert_color_space(arr, "YBR_FULL", "RGB")
    Image.fromarray(rgb, mode="RGB").save(out, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:2")
    return out.getvalue(), "YBR_FULL_422"


def _gdcm_jpeg_lossless(arr: np.ndarray, options: dict[str, Any], target: UID) -> bytes:
    """JPEG lossless (process 14) with GDCM, which pydicom has no encoder for."""
    import gdcm

    writer = gdcm.ImageWriter()  # owns the image: keep it alive while the image is used
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((int(options["columns"]), int(options["rows"]), 1))
    kind = gdcm.PhotometricInterpretation.GetPIType(str(options["photometric_interpretation"]))
    if kind == gdcm.PhotometricInterpretation.PI_END:
        raise TranscodeError(f"Unknown Photometric Interpretation '{options['photometric_interpretation']}'.")
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
    bits_stored = int(options["bits_stored"])
    image.SetPixelFormat(
        gdcm.PixelFormat(
            int(options["samples_per_pixel"]),
            int(options["bits_allocated"]),
            bits_stored,
            bits_stored - 1,
            int(options["pixel_representation"]),
        )
    )
    if int(options["samples_per_pixel"]) > 1:
        image.SetPlanarConfiguration(0)
    if int(options["bits_allocated"]) not in (8, 16):
        raise TranscodeError("JPEG Lossless holds samples of 8 or 16 bits allocated only.")
    if arr.nbytes % 2:
        raise TranscodeError("GDCM's JPEG Lossless encoder needs frames of an even number of bytes.")
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(native_bytes(arr, options))
    image.SetDataElement(element)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, _GDCM_JPEG[target])))
    change.SetInput(image)
    if not change.Change():
        raise TranscodeError("GDCM could not encode the frame as JPEG Lossless.")
    fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() < 1:
        raise TranscodeError("GDCM produced no JPEG Lossless codestream.")
    parts = []
    for i in range(fragments.GetNumberOfFragments()):
        buffer = fragments.GetFragment(i).GetByteValue().GetBuffer()
        parts.append(buffer.encode("utf-8", "surrogateescape"))
    return b"".join(parts)
