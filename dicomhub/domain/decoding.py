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
from dicomhub.domain.errors import NotAcceptable


def too_large_message(limit: int) -> str:
    """Azure's answer when an instance is too large to be transcoded or parsed."""
    return (
        f"Requested DICOM instance size is above the supported limit of {limit}. The entire instance can be "
        "retrieved with the original transfer syntax by specifying 'transfer-syntax=*' in the Accept header."
    )


def decoded_size(ds: Dataset) -> int:
    """Bytes the pixel data of ``ds`` takes once decoded (every frame), from its header alone."""
    rows = int(ds.get("Rows", 0) or 0)
    columns = int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return rows * columns * samples * max(1, (bits + 7) // 8) * max(1, frames)


class DecodeLimiter:
    def __init__(self, settings: Settings) -> None:
        self.max_file_size = settings.max_transcode_size
        self.max_decoded_size = settings.max_decoded_size
        self._slots = threading.BoundedSemaphore(max(1, settings.decode_slots))

    def check_file(self, file_size: int) -> None:
        """406 for a stored file too large to be parsed or transcoded (Azure's limit and message)."""
        if file_size > self.max_file_size:
            raise NotAcceptable(too_large_message(self.max_file_size))

    def check_pixels(self, ds: Dataset, frames: int | None = None) -> None:
        """406 when decoding ``frames`` frames (default: all) of ``ds`` would need more than the configured size:
        a small file that declares huge Rows x Columns x Frames must not make the server allocate them."""
        size = decoded_size(ds)
        if frames is not None:
            size = size // max(1, int(ds.get("NumberOfFrames", 1) or 1)) * frames
        if size > self.max_decoded_size:
            raise NotAcceptable(
                f"Decoding the pixel data would need {size} bytes, above the supported limit of "
                f"{self.max_decoded_size}. Retrieve it with transfer-syntax=* instead."
            )

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the decode slots while the block runs."""
        with self._slots:
            yield
