"""Pixel data to display images (PS3.18 rendered resources): the PS3.4 grayscale pipeline (Modality LUT, VOI LUT or
window, MONOCHROME1 inversion) and colour conversion (YBR to RGB, palette) to 8-bit samples, then scaling and
JPEG/PNG/GIF encoding. Encapsulated documents and video are located here but never decoded.

Everything works on one frame at a time: a frame is decoded from the open file with ``pixel_array(f, index=...)``,
which reads only that frame's bytes.
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
    apply_voi,
    apply_windowing,
    convert_color_space,
    iter_pixels,
    pixel_array,
)

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
FORMATS = {JPEG: "JPEG", PNG: "PNG", GIF: "GIF"}

DEFLATED = "1.2.840.10008.1.2.1.99"
# Encapsulated document SOP classes (PS3.3 A.45) and the media type of their document.
DOCUMENTS = {
    "1.2.840.10008.5.1.4.1.1.104.1": "application/pdf",
    "1.2.840.10008.5.1.4.1.1.104.2": "text/xml",  # CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "model/stl",
    "1.2.840.10008.5.1.4.1.1.104.4": "model/obj",
    "1.2.840.10008.5.1.4.1.1.104.5": "model/mtl",
}
# Video transfer syntaxes (PS3.5 8.2.5-8.2.8) and their media type (PS3.18 Table 8.7.4-2).
VIDEO = {
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.100.1": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.101.1": "video/mpeg",
    **{f"1.2.840.10008.1.2.4.{n}": "video/mp4" for n in range(102, 109)},
    **{f"1.2.840.10008.1.2.4.{n}.1": "video/mp4" for n in range(102, 107)},
}
# What pydicom's decoders hand back (raw=False) for these photometric interpretations: RGB samples.
DECODED_AS_RGB = {"YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
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
def read_header(f: BinaryIO) -> Dataset:
    """The dataset without its pixel data; ``f`` is left at the pixel data element."""
    return pydicom.dcmread(f, stop_before_pixels=True)


def frame_pixels(f: BinaryIO, header: Dataset, index: int) -> np.ndarray:
    """Frame ``index`` (0-based) of the file, decoded on its own. A deflated file cannot be read in place, so it is
    inflated whole first (it is small: deflate is only used for small datasets)."""
    if str(header.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        f.seek(0)
        return pixel_array(pydicom.dcmread(f), index=index)
    f.seek(0)
    return pixel_array(f, index=index)


def all_frames(f: BinaryIO, header: Dataset) -> Iterator[np.ndarray]:
    """Every frame in turn, one decoded at a time."""
    f.seek(0)
    if str(header.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        yield from iter_pixels(pydicom.dcmread(f))
    else:
        yield from iter_pixels(f)


def frame_attributes(header: Dataset, index: int) -> Dataset:
    """The header with the frame's functional groups (PS3.3 C.7.6.16) flattened in: rescale and VOI window of
    enhanced multi-frame objects live there rather than at the top level."""
    flat = Dataset()
    flat.file_meta = header.file_meta  # LUT Data in OW is read in the file's byte order
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "BitsAllocated",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "PresentationLUTShape",
    ):
        if keyword in header:
            setattr(flat, keyword, header[keyword].value)
    groups = [header.get("SharedFunctionalGroupsSequence")]
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append([per_frame[index]])
    for group in groups:
        if not group:
            continue
        item = group[0]
        for sequence, keywords in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            values = item.get(sequence)
            if values:
                for keyword in keywords:
                    if keyword in values[0]:
                        setattr(flat, keyword, values[0][keyword].value)
    return flat


# -- the display pipeline --------------------------------------------------------------------------------------------
def to_display(arr: np.ndarray, header: Dataset, attributes: Dataset, window: Window | None) -> np.ndarray:
    """One decoded frame as 8-bit samples: (rows, columns) grayscale or (rows, columns, 3) RGB."""
    photometric = str(attributes.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _grayscale(arr, attributes, photometric, window)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, header)
        bits = int(header.RedPaletteColorLookupTableDescriptor[2])
        return _to_8bit(rgb, 16 if bits > 8 else 8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise RenderError(f"Unsupported pixel layout {arr.shape} for '{photometric}'.")
    bits = int(attributes.get("BitsStored", 8) or 8)
    if photometric in DECODED_AS_RGB or photometric == "RGB":
        return _to_8bit(arr, bits)
    if photometric == "YBR_PARTIAL_422":
        return _to_8bit(convert_color_space(arr, "YBR_PARTIAL_422", "RGB"), bits)
    raise RenderError(f"Unsupported photometric interpretation '{photometric}'.")


def _to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned samples of ``bits`` significant bits scaled to 0..255."""
    if bits <= 8 and arr.dtype == np.uint8:
        return arr
    scaled = arr.astype(np.float64) * (255.0 / (2**bits - 1))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grayscale(arr: np.ndarray, attributes: Dataset, photometric: str, window: Window | None) -> np.ndarray:
    if arr.ndim != 2:
        raise RenderError(f"Unsupported pixel layout {arr.shape} for '{photometric}'.")
    values = apply_modality_lut(arr, attributes) if _has_modality_lut(attributes) else arr
    values = np.asarray(values, dtype=np.float64)
    if window is None and "WindowCenter" in attributes and "WindowWidth" in attributes:
        window = _file_window(attributes)
    if window is not None:
        out = _windowed(values, window)
    elif attributes.get("VOILUTSequence"):
        entries, first, lut_bits = (int(v) for v in attributes.VOILUTSequence[0].LUTDescriptor)
        inputs = np.rint(np.clip(values, first, first + (entries or 65536) - 1))
        out = apply_voi(inputs, attributes).astype(np.float64) * (255.0 / (2**lut_bits - 1))
    else:
        low, high = float(values.min()), float(values.max())
        out = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    inverse = str(attributes.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return 255 - out if photometric == "MONOCHROME1" or inverse else out


def _has_modality_lut(attributes: Dataset) -> bool:
    return bool(attributes.get("ModalityLUTSequence")) or "RescaleSlope" in attributes


def _file_window(attributes: Dataset) -> Window | None:
    """The first window of the file; none when it is unusable (a width below the function's minimum)."""
    center, width = attributes.WindowCenter, attributes.WindowWidth
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    function = str(attributes.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in WINDOW_FUNCTIONS:
        function = "LINEAR"
    if width < 1 if function == "LINEAR" else width <= 0:
        return None
    return Window(center, width, function)


def _windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to 0..255 with pydicom's implementation: an 8-bit unsigned output range."""
    output = Dataset()
    output.PhotometricInterpretation = "MONOCHROME2"
    output.BitsStored = 8
    output.PixelRepresentation = 0
    output.WindowCenter = window.center
    output.WindowWidth = window.width
    output.VOILUTFunction = window.function
    return apply_windowing(values, output)


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
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


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
    raw = header.get_item("EncapsulatedDocument")  # still raw: where its value is in the file
    if getattr(raw, "value_tell", None) is None:
        return None
    length = raw.length
    declared = header.get("EncapsulatedDocumentLength")
    if declared is not None and 0 <= int(declared) <= length:
        length = int(declared)  # the value may carry one padding byte
    return raw.value_tell, length


def video_fragments(f: BinaryIO) -> list[tuple[int, int]]:
    """(offset, length) of each fragment of encapsulated pixel data: the video stream, split in fragments."""
    header = read_header(f)
    if str(header.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        raise RenderError("Video in a deflated file is not supported.")
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
