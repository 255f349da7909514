"""WADO: find stored instances, stream their files (as stored or transcoded), frames and metadata."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.dicom.integrity import structure_damage
from dicomhub.dicom.transcode import (
    NATIVE,
    TranscodeError,
    can_transcode,
    little_endian_pixel_data,
    needs_pixel_decoding,
    transcode,
    transcode_frame,
)
from dicomhub.dicom.validation import pydicom_error
from dicomhub.domain.decoding import DecodeLimiter, pixel_geometry
from dicomhub.domain.errors import DicomHubError, InvalidRequest, NotAcceptable, ResourceNotFound
from dicomhub.index.records import Partition, StoredInstance
from dicomhub.index.repository import Index

ORIGINAL = "*"
NO_PIXEL_DATA = "The specified frame cannot be found: the instance has no pixel data."
HEADER_CACHE_SIZE = 256  # parsed headers of files whose frames are being transcoded (a few KB each)


@dataclass(frozen=True)
class Part:
    """One body part of a response: the syntax it is in and a way to produce its bytes."""

    transfer_syntax: str
    chunks: Iterator[bytes]


class RetrieveService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings, decoding: DecodeLimiter) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings
        self.decoding = decoding
        self._headers: OrderedDict[str, Dataset] = OrderedDict()
        self._headers_lock = threading.Lock()

    def instances(
        self,
        partition: Partition,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        original: bool = False,
    ) -> list[StoredInstance]:
        """``original``: the versions as first stored, before any bulk update (``msdicom-request-original``)."""
        found = self.index.find_instances(partition.key, study, series, sop, original)
        if not found:
            raise ResourceNotFound.scope(series, sop)
        return found

    def check_transfer_syntax(self, found: list[StoredInstance], target: str) -> None:
        """Azure's rules: a study/series of several instances is only served as stored, and only syntaxes we can
        produce from the stored one are acceptable."""
        if target == ORIGINAL:
            return
        if len(found) > 1:
            raise NotAcceptable(
                f"Accept transfer syntax '{target}' is not supported when multiple instances are matched. "
                "Specify 'transfer-syntax=*' to retrieve them in their original transfer syntax."
            )
        for inst in found:
            if not can_transcode(inst.transfer_syntax_uid, target):
                raise NotAcceptable(_cannot_transcode("instance", inst.transfer_syntax_uid, target))
            if inst.transfer_syntax_uid != target:
                self.decoding.check_file(inst.file_size)

    def file(self, inst: StoredInstance, target: str) -> Part:
        """The stored file, or (after :meth:`check_transfer_syntax`) the file transcoded, in memory: the size
        limits bound it, and a codec failure must be a 406 before the response starts."""
        stored = inst.transfer_syntax_uid
        if target in (ORIGINAL, stored):
            return Part(stored, self.blobs.iter_range(inst.blob_key))
        ds = self._read(inst)
        try:
            if not needs_pixel_decoding(stored, target):
                return Part(target, iter([transcode(ds, target)]))
            self.decoding.check_pixels(ds)
            with self.decoding.slot():
                return Part(target, iter([transcode(ds, target)]))
        except TranscodeError as exc:
            raise NotAcceptable(_cannot_transcode("instance", stored, target, exc)) from exc

    # -- frames -------------------------------------------------------------------------------------------------
    def frames(self, inst: StoredInstance, numbers: list[int], target: str) -> list[Part]:
        """The requested frames (1-based) in ``target``. Byte ranges recorded at store time when the stored bytes
        can be sent as they are; native frames re-ordered from the parsed file (big endian, deflated, not
        indexable); anything else decodes and encodes only the requested frames."""
        if not inst.frame_count:
            raise ResourceNotFound(NO_PIXEL_DATA)
        missing = [n for n in numbers if n > inst.frame_count]
        if missing:
            raise ResourceNotFound(f"The specified frame {missing[0]} cannot be found.")
        stored = inst.transfer_syntax_uid
        out = stored if target == ORIGINAL else target
        if not can_transcode(stored, out):
            raise NotAcceptable(_cannot_transcode("frames", stored, out))
        native_le = stored in NATIVE and UID(stored).is_little_endian
        ranges = json.loads(inst.frames_json) if inst.frames_json else None
        indexed = bool(ranges) and len(ranges) >= max(numbers)
        if indexed and (out == stored or (native_le and out in NATIVE)):
            return [Part(out, self._ranges(inst, ranges[n - 1])) for n in numbers]
        if not needs_pixel_decoding(stored, out):
            _, frames = self._parsed(inst, numbers, little_endian=out != stored)
            return [Part(out, iter([frame])) for frame in frames]
        # The ranges hold the stored bytes: big-endian native frames are swapped from the parsed file (their swap
        # unit depends on the Pixel Data VR, which the header read for ranges does not have)
        decodable = indexed and UID(stored).is_little_endian
        return self._transcoded_frames(inst, numbers, out, ranges if decodable else None)

    def _transcoded_frames(
        self, inst: StoredInstance, numbers: list[int], target: str, ranges: list | None
    ) -> list[Part]:
        """Decodes each requested frame alone (its bytes from the recorded ranges, or from the parsed file) and
        encodes it in ``target``."""
        stored = inst.transfer_syntax_uid
        if ranges is not None:
            header = self._header(inst)
            sources = [b"".join(self._ranges(inst, ranges[n - 1])) for n in numbers]
        else:
            header, sources = self._parsed(inst, numbers, little_endian=True)
        self.decoding.check_pixels(header, frames=len(numbers))
        source = stored if stored not in NATIVE else ExplicitVRLittleEndian  # native frames are little endian here
        try:
            with self.decoding.slot():
                encoded = [transcode_frame(header, frame, source, target) for frame in sources]
        except TranscodeError as exc:
            raise NotAcceptable(_cannot_transcode("frames", stored, target, exc)) from exc
        return [Part(target, iter([frame])) for frame in encoded]

    def _header(self, inst: StoredInstance) -> Dataset:
        """The attributes before the pixel data, kept for the most recently used files: a viewer asks for the frames
        of one instance one after another. Blob keys are never reused, so an entry cannot go stale."""
        with self._headers_lock:
            header = self._headers.get(inst.blob_key)
            if header is not None:
                self._headers.move_to_end(inst.blob_key)
                return header
        header = self._read(inst, stop_before_pixels=True)
        with self._headers_lock:
            self._headers[inst.blob_key] = header
            while len(self._headers) > HEADER_CACHE_SIZE:
                self._headers.popitem(last=False)
        return header

    def _read(self, inst: StoredInstance, stop_before_pixels: bool = False) -> Dataset:
        """The stored file parsed (whole, or up to its pixel data), or a 406 that says why it cannot be. Its
        structure is checked first, as at store time: a file stored before that check could nest sequences deep
        enough to make pydicom recurse (and its writer re-wrap tracebacks) without bound."""
        with self.blobs.open(inst.blob_key) as f:
            settings = self.settings
            damage = structure_damage(f, inst.file_size, settings.max_sequence_depth, settings.max_transcode_size)
            if damage is not None:
                raise NotAcceptable(f"The stored file cannot be read: {damage.message}")
            f.seek(0)
            try:
                return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
            except Exception as exc:  # pydicom raises anything on bytes it cannot interpret
                raise NotAcceptable(f"The stored file cannot be read: {pydicom_error(exc)}") from None

    def _ranges(self, inst: StoredInstance, fragments: list[list[int]]) -> Iterator[bytes]:
        for offset, length in fragments:
            yield from self.blobs.iter_range(inst.blob_key, offset, length)

    def _parsed(self, inst: StoredInstance, numbers: list[int], little_endian: bool) -> tuple[Dataset, list[bytes]]:
        """(dataset, the requested frames) of the parsed file: native pixel bytes (swapped to little endian when
        asked and needed), or the joined fragments of each frame of encapsulated pixel data."""
        self.decoding.check_file(inst.file_size)
        ds = self._read(inst)
        if "PixelData" not in ds:
            raise ResourceNotFound(NO_PIXEL_DATA)
        try:
            if inst.transfer_syntax_uid in NATIVE:
                return ds, _native_frames(ds, inst.transfer_syntax_uid, numbers, little_endian)
            return ds, _encapsulated_frames(ds, numbers, inst.frame_count)
        except DicomHubError:
            raise
        except Exception as exc:  # pixel data whose value or offset tables pydicom cannot read
            raise NotAcceptable(f"The frames of the instance cannot be extracted: {pydicom_error(exc)}") from None

    # -- metadata -----------------------------------------------------------------------------------------------
    def metadata(
        self, partition: Partition, study: str, series: str | None, sop: str | None, original: bool = False
    ) -> tuple[str, str]:
        """(ETag, DICOM JSON array) of the scope, assembled from the per-instance JSON written at store time.

        The ETag is ``{max watermark}-{count}`` for a study or series and ``{watermark}`` for an instance (Azure's
        form): any store, update or delete in the scope changes it.
        """
        documents = self.index.metadata(partition.key, study, series, sop, original)
        if not documents:
            raise ResourceNotFound.scope(series, sop)
        newest = max(watermark for watermark, _ in documents)
        etag = str(newest) if sop is not None else f"{newest}-{len(documents)}"
        return etag, "[" + ",".join(document for _, document in documents) + "]"


def _cannot_transcode(what: str, source: str, target: str, reason: Exception | None = None) -> str:
    message = f"The {what} cannot be transcoded from '{source}' to '{target}'."
    return f"{message} {reason}" if reason is not None else message


def _frame_missing(number: int) -> ResourceNotFound:
    return ResourceNotFound(f"The specified frame {number} cannot be found.")


def _native_frames(ds: Dataset, syntax: str, numbers: list[int], little_endian: bool) -> list[bytes]:
    """The requested frames (1-based) of native pixel data, each copied out alone: a file of a million one-byte
    frames must not become a million objects. 1-bit frames need not start on a byte boundary: each is repacked."""
    geometry = pixel_geometry(ds)
    raw = little_endian_pixel_data(ds, syntax) if little_endian else ds.PixelData
    length = geometry.frame_length
    if length is not None:
        available = min(geometry.frames, len(raw) // length)
    else:
        pixels = geometry.rows * geometry.columns * geometry.samples_per_pixel
        available = min(geometry.frames, len(raw) * 8 // pixels)
    frames = []
    for number in numbers:
        if number > available:
            raise _frame_missing(number)
        if length is not None:
            frames.append(raw[(number - 1) * length : number * length])
            continue
        first_bit = (number - 1) * pixels
        packed = np.frombuffer(raw[first_bit // 8 : (first_bit + pixels + 7) // 8], dtype=np.uint8)
        bits = np.unpackbits(packed, bitorder="little")[first_bit % 8 : first_bit % 8 + pixels]
        frames.append(np.packbits(bits, bitorder="little").tobytes())
    return frames


def _encapsulated_frames(ds: Dataset, numbers: list[int], count: int) -> list[bytes]:
    """The requested frames (1-based) of encapsulated pixel data, each its fragments joined; only those are kept."""
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    wanted = set(numbers)
    found: dict[int, bytes] = {}
    frames = generate_fragmented_frames(ds.PixelData, number_of_frames=count, extended_offsets=extended)
    for number, fragments in enumerate(islice(frames, max(numbers)), start=1):
        if number in wanted:
            found[number] = b"".join(fragments)
    for number in numbers:
        if number not in found:
            raise _frame_missing(number)
    return [found[number] for number in numbers]


MAX_FRAME_NUMBER = 2**31 - 1  # Azure reads frame numbers as 32-bit integers: a larger one is not a number (400)


def parse_frame_numbers(text: str) -> list[int]:
    """The frame numbers of a comma list (WADO frames and rendered frames alike): ASCII digits only, since
    ``str.isdigit`` also takes '²' or '①', which ``int`` refuses, and ``int`` takes Arabic-Indic digits."""
    numbers = []
    for token in text.split(","):
        token = token.strip()
        if not (token.isascii() and token.isdigit() and 1 <= int(token) <= MAX_FRAME_NUMBER):
            raise InvalidRequest(
                f"The specified frames value '{text}' is not valid. "
                f"Frame numbers are integers from 1 to {MAX_FRAME_NUMBER}."
            )
        numbers.append(int(token))
    return numbers
