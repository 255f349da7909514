"""Pixel data to display images (PS3.18 rendered resources): the PS3.4 grayscale pipeline (Modality LUT, VOI LUT or
window, MONOCHROME1 inversion) and colour conversion (YBR to RGB, palette) to 8-bit samples, then scaling and
JPEG/PNG/GIF encoding. Encapsulated documents and video are located here but never decoded.

Everything works on one frame at a time: a frame is decoded from the open file by pydicom's decoder, which reads only
that frame's bytes.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID

from dicomhub.dicom.transcode import assumed_pixel_options, decoding_plugin

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"

DEFLATED = "1.2.840.10008.1.2.1.99"
# Encapsulated document SOP classes (PS3.3 A.45) and the media type of their document.
DOCUMENTS = {
    "1.2.840.10008.5.1.4.1.1.104.1": "application/pdf",
    "1.2.840.10008.5.1.4.1.1.104.2": "text/xml",  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "model/stl",
    "1.2.840.10008.5.1.4.1.1.104.4": "model/obj",
    "1.2.840.10008.5.1.4.1.1.104.5": "model/mtl",
}
# Video transfer syntaxes (PS3.5 8.2.5-8.2.8) and the media type PS3.18 gives their rendered stream.
VIDEO = {
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.100.1": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.101.1": "video/mpeg",
    **{f"1.2.840.10008.1.2.4.{n}": "video/mp4" for n in range(102, 109)},
    **{f"1.2.840.10008.1.2.4.{n}.1": "video/mp4" for n in range(102, 107)},
}
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class RenderError(Exception):
    """The pixel data cannot be turned into an image."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2); ``function`` is LINEAR, LINEAR_EXACT or SIGMOID."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class Viewport:
    """PS3.18 viewport: fit the image (or the source region ``sx, sy, sw, sh``) into ``width`` x ``height``."""

    width: int
    height: int
    region: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class RenderOptions:
    media_type: str = JPEG
    quality: int = 100
    window: Window | None = None
    viewport: Viewport | None = None
    enlarge: bool = True  # scale up to the viewport too (thumbnails only shrink)

    def key(self) -> str:
        """A stable text for everything that changes the output (cache keys, ETags)."""
        return repr((self.media_type, self.quality, self.window, self.viewport, self.enlarge))


# -- reading ---------------------------------------------------------------------------------------------------------
PIXEL_KEYWORDS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
FUNCTIONAL_GROUPS = (
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)


@dataclass
class Frame:
    pixels: np.ndarray
    photometric: str  # as decoded: YBR data comes out of pydicom's decoders as RGB
    attributes: Dataset  # what the grayscale pipeline reads, functional groups included


class PixelSource:
    """An open DICOM file read up to its pixel data; frames are decoded from the file one at a time, by the pydicom
    decoder and plugin transcode.py uses for the transfer syntax, reading only the frame's bytes. Image Pixel
    attributes the file leaves out take the values viewers assume."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.header = pydicom.dcmread(f, stop_before_pixels=True)
        self._pixel_offset = f.tell()  # the pixel data element's tag
        self.transfer_syntax = UID(self.header.file_meta.get("TransferSyntaxUID", ""))

    def has_pixel_data(self) -> bool:
        """Whether a pixel data element follows the header (read, not decoded). Deflated files are only known once
        inflated, when a frame is asked for."""
        return self.transfer_syntax == DEFLATED or self._pixel_element() is not None

    def frame(self, index: int) -> Frame:
        """Frame ``index`` (0-based)."""
        src, options = self._decoder_input()
        pixels, properties = get_decoder(self.transfer_syntax).as_array(src, index=index, **options)
        return self._frame(index, pixels, properties)

    def frames(self) -> Iterator[Frame]:
        """Every frame in turn, one decoded at a time."""
        src, options = self._decoder_input()
        for index, (pixels, properties) in enumerate(get_decoder(self.transfer_syntax).iter_array(src, **options)):
            yield self._frame(index, pixels, properties)

    def _pixel_element(self) -> tuple[str, bytes] | None:
        """(keyword, the element's first 8 bytes) of the pixel data element after the header, leaving the file
        after those bytes; None when there is none."""
        self.f.seek(self._pixel_offset)
        head = self.f.read(8)
        if len(head) < 8:
            return None
        group, element = struct.unpack("<HH" if self.transfer_syntax.is_little_endian else ">HH", head[:4])
        keyword = PIXEL_KEYWORDS.get(group << 16 | element)
        return (keyword, head) if keyword else None

    def _decoder_input(self) -> tuple[BinaryIO | Dataset, dict]:
        """The file positioned at the pixel data value, and the decoding options from the header. A deflated file
        cannot be read in place: it is inflated whole (deflate is only used for small datasets)."""
        common = {"decoding_plugin": decoding_plugin(self.transfer_syntax), **assumed_pixel_options(self.header)}
        if self.transfer_syntax == DEFLATED:
            self.f.seek(0)
            inflated = pydicom.dcmread(self.f)
            if not any(keyword in inflated for keyword in PIXEL_KEYWORDS.values()):
                raise RenderError("The instance has no pixel data.")
            return inflated, common
        found = self._pixel_element()
        if found is None:
            raise RenderError("The instance has no pixel data.")
        keyword, head = found
        options = as_pixel_options(self.header, transfer_syntax_uid=self.transfer_syntax, pixel_keyword=keyword)
        if not self.transfer_syntax.is_implicit_VR:
            options["pixel_vr"] = head[4:6].decode("ascii")
            self.f.read(4)  # the 32-bit length (after VR and 2 reserved bytes): the value starts next
        return self.f, {**options, **common}

    def _frame(self, index: int, pixels: np.ndarray, properties: dict) -> Frame:
        photometric = str(properties.get("photometric_interpretation") or self.header.get("PhotometricInterpretation"))
        return Frame(pixels, photometric.strip().upper(), frame_attributes(self.header, index))


def frame_attributes(header: Dataset, index: int) -> Dataset:
    """The header, with the frame's functional groups (PS3.3 C.7.6.16) flattened in when it has some: rescale and
    VOI window of enhanced multi-frame objects live there rather than at the top level."""
    groups = [header.get("SharedFunctionalGroupsSequence")]
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append([per_frame[index]])
    items = [group[0] for group in groups if group]
    if not items:
        return header
    flat = Dataset()
    flat.file_meta = header.file_meta  # LUT Data in OW is read in the file's byte order
    for keyword in (
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "PresentationLUTShape",
    ):
        if keyword in header:
            setattr(flat, keyword, header[keyword].value)
    for item in items:
        for sequence, keywords in FUNCTIONAL_GROUPS:
            values = item.get(sequence)
            for keyword in keywords if values else ():
                if keyword in values[0]:
                    setattr(flat, keyword, values[0][keyword].value)
    return flat


# -- the display pipeline --------------------------------------------------------------------------------------------
def to_display(frame: Frame, header: Dataset, window: Window | None) -> np.ndarray:
    """One decoded frame as 8-bit samples: (rows, columns) grayscale or (rows, columns, 3) RGB."""
    arr, photometric = frame.pixels, frame.photometric
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _grayscale(arr, frame.attributes, photometric, window)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, header)
        bits = int(header.RedPaletteColorLookupTableDescriptor[2])
        return _to_8bit(rgb, 16 if bits > 8 else 8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise RenderError(f"Unsupported pixel layout {arr.shape} for '{photometric}'.")
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 8)  # Bits Stored left out: all of them
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric not in ("RGB", "YBR_ICT", "YBR_RCT"):  # J2K decoders undo the ICT/RCT themselves
        raise RenderError(f"Unsupported photometric interpretation '{photometric}'.")
    return _to_8bit(arr, bits)


def _to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned samples of ``bits`` significant bits scaled to 0..255."""
    if bits <= 8 and arr.dtype == np.uint8:
        return arr
    scaled = arr.astype(np.float64) * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grayscale(arr: np.ndarray, attributes: Dataset, photometric: str, window: Window | None) -> np.ndarray:
    """PS3.4 grayscale pipeline to 8 bits. Integer pixels go through it once per value between their minimum and
    maximum, then each pixel is looked up (far fewer values than pixels for most images)."""
    if arr.ndim != 2:
        raise RenderError(f"Unsupported pixel layout {arr.shape} for '{photometric}'.")
    if window is None and "WindowCenter" in attributes and "WindowWidth" in attributes:
        window = _file_window(attributes)
    invert = photometric == "MONOCHROME1" or str(attributes.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if arr.dtype.kind in "iu":
        low, high = int(arr.min()), int(arr.max())
        if high - low < arr.size:
            offsets = arr if low == 0 and arr.dtype.kind == "u" else np.subtract(arr, low, dtype=np.int64)
            present = None
            if window is None and attributes.get("ModalityLUTSequence") and not attributes.get("VOILUTSequence"):
                present = np.unique(offsets)  # a LUT need not be monotonic: min/max over the values present only
            lut = _gray_values(np.arange(low, high + 1), attributes, window, invert, present)
            return lut[offsets]
    return _gray_values(arr, attributes, window, invert, None)


def _gray_values(
    values: np.ndarray, attributes: Dataset, window: Window | None, invert: bool, present: np.ndarray | None
) -> np.ndarray:
    """Modality LUT, then the window, else the VOI LUT, else the min/max of the values; inverted for MONOCHROME1."""
    values = apply_modality_lut(values, attributes) if _has_modality_lut(attributes) else values
    values = np.asarray(values, dtype=np.float64)
    if window is not None:
        out = _windowed(values, window)
    elif attributes.get("VOILUTSequence"):
        out = _voi_lut(values, attributes)
    else:
        seen = values if present is None else values[present]
        low, high = float(seen.min()), float(seen.max())
        out = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return 255 - out if invert else out


def _voi_lut(values: np.ndarray, attributes: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1 VOI LUT to 0..255. Not pydicom's apply_voi: it indexes an 8-bit LUT with 8-bit integers, so
    inputs past 255 wrap around."""
    item = attributes.VOILUTSequence[0]
    _, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        little = attributes.file_meta.TransferSyntaxUID.is_little_endian
        data = np.frombuffer(data, dtype="<u2" if little else ">u2")
    table = np.asarray(data, dtype=np.float64).ravel()
    index = np.clip(np.rint(values) - first, 0, len(table) - 1).astype(np.intp)
    return table[index] * (255.0 / (2**bits - 1))


def _has_modality_lut(attributes: Dataset) -> bool:
    return bool(attributes.get("ModalityLUTSequence")) or "RescaleSlope" in attributes


def _file_window(attributes: Dataset) -> Window | None:
    """The first window of the file; none when it is unusable (empty, or a width below the function's minimum)."""
    try:
        center, width = (
            float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
            for v in (attributes.WindowCenter, attributes.WindowWidth)
        )
    except (TypeError, ValueError, IndexError):
        return None
    function = str(attributes.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in WINDOW_FUNCTIONS:
        function = "LINEAR"
    if width < 1 if function == "LINEAR" else width <= 0:
        return None
    return Window(center, width, function)


def _windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3 windowing to 0..255 (pydicom's apply_windowing ties its output range to a
    dataset's bit depth; here it is always 8 bits, and values are often a whole lookup table)."""
    center, width = window.center, window.width
    if window.function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if window.function == "LINEAR":
        center, width = center - 0.5, width - 1
    if width <= 0:  # LINEAR with a width of 1: a threshold at the center
        return np.where(values > center, 255.0, 0.0)
    return np.clip(((values - center) / width + 0.5) * 255.0, 0.0, 255.0)


# -- images ----------------------------------------------------------------------------------------------------------
def to_image(pixels: np.ndarray, viewport: Viewport | None, enlarge: bool = True) -> Image.Image:
    """An 8-bit frame as a Pillow image, cut to the viewport's source region and scaled to fit inside it."""
    if viewport is not None and viewport.region is not None:
        pixels = _region(pixels, viewport.region)
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB" if pixels.ndim == 3 else "L")
    if viewport is None:
        return image
    scale = min(viewport.width / image.width, viewport.height / image.height)
    if scale >= 1 and not enlarge:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)  # as Image.thumbnail: fast, no aliasing


def _region(pixels: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """PS3.18 source region: ``sw``/``sh`` count from ``sx``/``sy``; a negative one takes the pixels before it and
    flips that axis."""
    sx, sy, sw, sh = region
    rows, columns = pixels.shape[:2]
    if not (0 <= sx < columns and 0 <= sy < rows):
        raise RenderError(f"The viewport region starts outside the {columns}x{rows} image.")
    x0, x1 = (sx, min(columns, sx + sw)) if sw > 0 else (max(0, sx + sw + 1), sx + 1)
    y0, y1 = (sy, min(rows, sy + sh)) if sh > 0 else (max(0, sy + sh + 1), sy + 1)
    cut = pixels[y0:y1, x0:x1]
    if sw < 0:
        cut = cut[:, ::-1]
    if sh < 0:
        cut = cut[::-1]
    return cut


def encode(images: list[Image.Image], media_type: str, quality: int, frame_ms: float = 100.0) -> bytes:
    """JPEG/PNG of the first image, or a GIF of them all (animated when there are several)."""
    buffer = io.BytesIO()
    first = images[0]
    if media_type == JPEG:
        first.save(buffer, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif media_type == PNG:
        first.save(buffer, "PNG", compress_level=1)
    elif len(images) == 1:
        first.save(buffer, "GIF")
    else:
        first.save(buffer, "GIF", save_all=True, append_images=images[1:], duration=round(frame_ms), loop=0)
    return buffer.getvalue()


def frame_time_ms(header: Dataset) -> float:
    """Display time of one frame of a cine: Frame Time, else from the recommended frame rate, else 100 ms."""
    try:
        if header.get("FrameTime"):
            return max(10.0, float(header.FrameTime))
        rate = header.get("RecommendedDisplayFrameRate") or header.get("CineRate")
        if rate:
            return max(10.0, 1000.0 / float(rate))
    except (TypeError, ValueError):
        pass
    return 100.0


# -- documents and video ---------------------------------------------------------------------------------------------
def document_range(f: BinaryIO) -> tuple[int, int] | None:
    """(offset, length) of the Encapsulated Document value in the file, without reading it; None when it cannot be
    located in place (deflated files, no document)."""
    header = pydicom.dcmread(f, defer_size=256, specific_tags=["EncapsulatedDocument", "EncapsulatedDocumentLength"])
    if str(header.file_meta.get("TransferSyntaxUID", "")) == DEFLATED or "EncapsulatedDocument" not in header:
        return None
    raw = header.get_item("EncapsulatedDocument", keep_deferred=True)  # not read: where its value is in the file
    if getattr(raw, "value_tell", None) is None:
        return None
    length = raw.length
    declared = header.get("EncapsulatedDocumentLength")
    if declared is not None and 0 <= int(declared) <= length:
        length = int(declared)  # the value may carry one padding byte
    return raw.value_tell, length


def video_fragments(f: BinaryIO) -> list[tuple[int, int]]:
    """(offset, length) of each fragment of encapsulated pixel data: the video stream, split in fragments."""
    pydicom.dcmread(f, stop_before_pixels=True)  # leaves f at the pixel data element
    head = f.read(12)  # tag, VR, reserved, undefined length: encapsulated data is explicit VR little endian
    if len(head) < 12 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010) or head[8:12] != b"\xff\xff\xff\xff":
        raise RenderError("The pixel data is not encapsulated.")
    parse_basic_offsets(f)
    _, offsets = parse_fragments(f)
    fragments = []
    for offset in offsets:
        f.seek(offset + 4)
        (length,) = struct.unpack("<L", f.read(4))
        fragments.append((offset + 8, length))
    return fragments
