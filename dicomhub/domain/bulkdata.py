"""Bulk data: metadata with BulkDataURI in place of bulk values, the values those URIs name, and pixel data (CP-2040).

Computed from the stored file on demand (parsed up to the pixel data; values served by range reads). Deflated
files are re-encoded in memory first (their offsets would be into the inflated stream), within the transcoding
size limit.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.dicom.bulkdata import Located, add_bulkdata, format_path, inflated, locate, parse_path
from dicomhub.dicom.transcode import NATIVE
from dicomhub.domain.decoding import too_large_message
from dicomhub.domain.errors import InvalidRequest, NotAcceptable, ResourceNotFound
from dicomhub.domain.retrieve import ORIGINAL, RetrieveService
from dicomhub.index.records import Partition, StoredInstance

log = logging.getLogger(__name__)
NO_PIXEL_DATA = "The specified instance has no pixel data."
CACHE_ENTRIES = 20_000  # located files kept per process: repeated metadata of a study skips parsing its files
Segment = tuple[int, int]  # (offset, length) in a value's source


@dataclass(frozen=True)
class Value:
    """Bytes to serve: segments of a source (a blob, or bytes in memory), read lazily, in any sub-range."""

    transfer_syntax: str
    segments: tuple[Segment, ...]
    read: Callable[[int, int], Iterator[bytes]]

    @property
    def length(self) -> int:
        return sum(length for _, length in self.segments)

    def chunks(self, start: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The bytes ``start`` .. ``start + length`` of the value (to its end when ``length`` is ``None``)."""
        end = self.length if length is None else start + length
        position = 0
        for offset, size in self.segments:
            low, high = max(start, position), min(end, position + size)
            if low < high:
                yield from self.read(offset + low - position, high - low)
            position += size


@dataclass(frozen=True)
class PixelData:
    """The pixel data of one instance: one value (native), or one value per frame (encapsulated)."""

    instance: StoredInstance
    values: list[Value]
    per_frame: bool


def _memory_reader(data: bytes) -> Callable[[int, int], Iterator[bytes]]:
    return lambda offset, length: iter((data[offset : offset + length],))


def _memory_value(transfer_syntax: str, data: bytes) -> Value:
    return Value(transfer_syntax, ((0, len(data)),), _memory_reader(data))


class BulkdataService:
    def __init__(self, blobs: BlobStore, retrieve: RetrieveService, settings: Settings) -> None:
        self.blobs = blobs
        self.retrieve = retrieve
        self.settings = settings
        self._cache = _Cache(CACHE_ENTRIES)

    # -- metadata -----------------------------------------------------------------------------------------------
    def metadata(
        self, partition: Partition, study: str, series: str | None, sop: str | None, base_url: str
    ) -> tuple[str, str]:
        """(ETag, DICOM JSON array) as :meth:`RetrieveService.metadata`, with the bulk values of each instance's
        file added as BulkDataURI (or InlineBinary when short). URIs are absolute, under ``base_url``
        (``{scheme}://{host}/v{n}[/partitions/{name}]``). The ETag gets a suffix: it is another representation."""
        etag, body = self.retrieve.metadata(partition, study, series, sop)
        documents = json.loads(body)
        found = {(i.series_uid, i.sop_uid): i for i in self.retrieve.instances(partition, study, series, sop)}
        for document in documents:
            inst = found.get((_uid(document, "0020000E"), _uid(document, "00080018")))
            if inst is None:
                continue  # deleted between the two reads
            try:
                located, _ = self._located(inst)
            except (FileNotFoundError, NotAcceptable) as exc:  # deleted since, or unreadable: JSON without bulk data
                log.warning("bulk data left out of metadata", extra={"sop_uid": inst.sop_uid, "reason": str(exc)})
                continue
            url = instance_url(base_url, inst)
            add_bulkdata(
                document, located, lambda path, url=url: f"{url}/bulkdata/{format_path(path)}", f"{url}/pixeldata"
            )
        return f"{etag}-bulkdata", json.dumps(documents, separators=(",", ":"), ensure_ascii=False)

    # -- single values ------------------------------------------------------------------------------------------
    def value(self, partition: Partition, study: str, series: str, sop: str, path_text: str) -> Value:
        """The value at the element path (see :mod:`dicomhub.dicom.bulkdata`) of one instance, as stored."""
        try:
            path = parse_path(path_text)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        inst = self.retrieve.instances(partition, study, series, sop)[0]
        located, read = self._located(inst)
        value = located.find(path)
        if value is None:
            raise ResourceNotFound(
                f"The instance has no bulk data element at '{format_path(path)}' (no such element, or one whose "
                "value is not bulk data: a sequence, a name, a short number or text)."
            )
        return Value(served_syntax(inst), ((value.offset, value.length),), read)

    # -- pixel data ---------------------------------------------------------------------------------------------
    def instance_pixel_data(self, partition: Partition, study: str, series: str, sop: str) -> PixelData:
        """The pixel data of one instance: native as one value, encapsulated as its frames (stored syntax)."""
        pixel = self._pixel_data(self.retrieve.instances(partition, study, series, sop)[0])
        if pixel is None:
            raise ResourceNotFound(NO_PIXEL_DATA)
        return pixel

    def scope_pixel_data(
        self, partition: Partition, study: str, series: str | None
    ) -> tuple[set[str], Iterator[PixelData]]:
        """(transfer syntaxes served, the pixel data of each instance of a study or series that has some). Each
        file is parsed when its turn comes, so the answer starts at once; an instance whose file cannot be read
        by then (deleted since) is left out. The iterator raises ``ResourceNotFound`` if no instance has any."""
        found = self.retrieve.instances(partition, study, series)

        def each() -> Iterator[PixelData]:
            any_found = False
            for inst in found:
                try:
                    pixel = self._pixel_data(inst)
                except (FileNotFoundError, NotAcceptable) as exc:
                    log.warning("pixel data left out", extra={"sop_uid": inst.sop_uid, "reason": str(exc)})
                    continue
                if pixel is not None:
                    any_found = True
                    yield pixel
            if not any_found:
                raise ResourceNotFound("The specified scope has no pixel data.")

        return {served_syntax(inst) for inst in found}, each()

    def _pixel_data(self, inst: StoredInstance) -> PixelData | None:
        if inst.transfer_syntax_uid not in NATIVE:
            if not inst.frame_count:
                return None
            ranges = json.loads(inst.frames_json) if inst.frames_json else []
            if len(ranges) == inst.frame_count:
                read = self._blob_reader(inst)
                values = [Value(inst.transfer_syntax_uid, tuple(map(tuple, r)), read) for r in ranges]
            else:  # not indexed at store time: the frames of the parsed file
                parts = self.retrieve.frames(inst, list(range(1, inst.frame_count + 1)), ORIGINAL)
                values = [_memory_value(inst.transfer_syntax_uid, b"".join(p.chunks)) for p in parts]
            return PixelData(inst, values, per_frame=True)
        located, read = self._located(inst)
        if located.pixel is None:
            return None
        pixel = located.pixel
        return PixelData(inst, [Value(served_syntax(inst), ((pixel.offset, pixel.length),), read)], per_frame=False)

    # -- files --------------------------------------------------------------------------------------------------
    def _blob_reader(self, inst: StoredInstance) -> Callable[[int, int], Iterator[bytes]]:
        return lambda offset, length: self.blobs.iter_range(inst.blob_key, offset, length)

    def _located(self, inst: StoredInstance) -> tuple[Located, Callable[[int, int], Iterator[bytes]]]:
        """The bulk values of the instance's file, and a reader of that file's bytes. A deflated file is re-encoded
        in memory first (offsets are into that copy); the others' values are cached by blob key, which is never
        reused for other content, so a cached entry cannot go stale."""
        threshold = self.settings.bulkdata_uri_threshold
        if inst.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
            if inst.file_size > self.settings.max_transcode_size:
                raise NotAcceptable(too_large_message(self.settings.max_transcode_size))
            with self.blobs.open(inst.blob_key) as f:
                data = inflated(f)
            return _locate(io.BytesIO(data), threshold), _memory_reader(data)
        located = self._cache.get(inst.blob_key)
        if located is None:
            with self.blobs.open(inst.blob_key) as f:
                located = _locate(f, threshold)
            self._cache.put(inst.blob_key, located)
        return located, self._blob_reader(inst)


class _Cache:
    """A small thread-safe LRU of located values (each entry is a few hundred bytes per bulk value)."""

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[str, Located] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: str) -> Located | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: str, located: Located) -> None:
        with self._lock:
            self._entries[key] = located
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)


def _locate(f: BinaryIO, threshold: int) -> Located:
    try:
        return locate(f, threshold)
    except Exception as exc:  # whatever stops the parser; stored files were parsed at store time, so defensive only
        raise NotAcceptable(f"The bulk data of the instance cannot be read: {exc}") from None


def served_syntax(inst: StoredInstance) -> str:
    """The transfer syntax values are served in: as stored, but a deflated file's values come from its inflated
    Explicit VR Little Endian copy."""
    syntax = inst.transfer_syntax_uid
    return str(ExplicitVRLittleEndian) if syntax == DeflatedExplicitVRLittleEndian else syntax


def _uid(document: dict, key: str) -> str | None:
    values = document.get(key, {}).get("Value")
    return values[0] if values else None


def instance_url(base_url: str, inst: StoredInstance) -> str:
    return f"{base_url}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
