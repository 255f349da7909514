"""Bounds on pixel work (decode, encode, render): a size limit checked before any work, and a fixed number of
slots so a few large transcodes cannot take every CPU or all memory while small requests wait behind them.

Callers run in worker threads (never on the event loop); a call that finds every slot busy waits in its thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom.dataset import Dataset

from dicomhub.config import Settings
from dicomhub.dicom.frames import ImageAttributeError, ImageGeometry, image_geometry
from dicomhub.domain.errors import NotAcceptable


def too_large_message(limit: int) -> str:
    """Azure's answer when an instance is too large to be transcoded or parsed."""
    return (
        f"Requested DICOM instance size is above the supported limit of {limit}. The entire instance can be "
        "retrieved with the original transfer syntax by specifying 'transfer-syntax=*' in the Accept header."
    )


def pixel_geometry(ds: Dataset) -> ImageGeometry:
    """The image attributes of a stored file, or a 406 that names the damaged one: a file stored with
    NumberOfFrames ``abc`` or Rows of an unknown VR is kept (as Azure keeps it), but its pixels cannot be decoded."""
    try:
        return image_geometry(ds)
    except ImageAttributeError as exc:
        raise NotAcceptable(f"The pixel data of the instance cannot be decoded: {exc}") from None


class DecodeLimiter:
    def __init__(self, settings: Settings) -> None:
        self.max_file_size = settings.max_transcode_size
        self.max_decoded_size = settings.max_decoded_size
        self._slots = threading.BoundedSemaphore(max(1, settings.decode_slots))

    def check_file(self, file_size: int) -> None:
        """406 for a stored file too large to be parsed or transcoded (Azure's limit and message)."""
        if file_size > self.max_file_size:
            raise NotAcceptable(too_large_message(self.max_file_size))

    def check_pixels(self, ds: Dataset, frames: int | None = None) -> ImageGeometry:
        """406 when decoding ``frames`` frames (default: all) of ``ds`` would need more than the configured size:
        a small file that declares huge Rows x Columns x Frames must not make the server allocate them; 406 too
        when an image attribute is damaged (:func:`pixel_geometry`). Returns the checked geometry."""
        geometry = pixel_geometry(ds)
        size = geometry.decoded_size // geometry.frames * (geometry.frames if frames is None else frames)
        if size > self.max_decoded_size:
            raise NotAcceptable(
                f"Decoding the pixel data would need {size} bytes, above the supported limit of "
                f"{self.max_decoded_size}. Retrieve it with transfer-syntax=* instead."
            )
        return geometry

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the decode slots while the block runs."""
        with self._slots:
            yield
