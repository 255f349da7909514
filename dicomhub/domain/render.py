"""Rendered images and thumbnails (PS3.18 rendered resources, Supplement 203 thumbnails).

Every decode is bounded by the DecodeLimiter: file size and decoded size are checked from the header before any
pixel work, and the work itself holds one of the decode slots. Only the requested frame is decoded.

A study or series is represented by one instance: the middle one (in storage order) of the image instances of its
first series (in Series Instance UID order); a study or series without images is represented by its first instance
(a document, say).

Thumbnails are cached as files under ``{data dir}/thumbnails/{partition}/``, named by the instance's watermark and a
digest of the rendering parameters. Watermarks are never reused, so a stored thumbnail can only ever belong to the
instance it was made from; an instance is looked up in the index before its thumbnail is read, so one deleted is a
404 at once, and its files age out of the cache, which is bounded in size (oldest first).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from PIL import Image
from pydicom.dataset import Dataset

from dicomhub.blobs.base import BlobStore
from dicomhub.dicom import render
from dicomhub.dicom.render import DOCUMENTS, GIF, VIDEO, RenderError, RenderOptions
from dicomhub.domain.decoding import DecodeLimiter
from dicomhub.domain.errors import NotAcceptable, ResourceNotFound
from dicomhub.domain.retrieve import NO_PIXEL_DATA, RetrieveService
from dicomhub.index.records import Partition, StoredInstance

log = logging.getLogger(__name__)

RENDER_FAILED = "An error was encountered when attempting to convert the dicom file into an image"
NO_PIXELS_TO_RENDER = f"{RENDER_FAILED}: the instance has no pixel data."
EXTENSIONS = {render.JPEG: "jpg", render.PNG: "png", GIF: "gif"}


def document_type(inst: StoredInstance) -> str | None:
    """The media type an encapsulated document or video instance is rendered as (its own bytes), else None."""
    return DOCUMENTS.get(inst.sop_class_uid) or VIDEO.get(inst.transfer_syntax_uid)


def _digest(frame: int | None, options: RenderOptions | None, thumbnail: bool) -> str:
    text = repr((frame, options.key() if options else "document", thumbnail))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ThumbnailCache:
    """Encoded thumbnails on disk, bounded to ``max_bytes`` in total (least recently used go first)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._total: int | None = None  # this process's estimate; a scan corrects it

    def path(self, partition_key: int, watermark: int, key: str, media_type: str) -> Path:
        return (
            self.folder / str(partition_key) / f"{watermark % 256:02x}" / f"{watermark}-{key}.{EXTENSIONS[media_type]}"
        )

    def get(self, path: Path) -> bytes | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return data

    def put(self, path: Path, data: bytes) -> None:
        """Writes atomically (a reader never sees half a file); a failure only costs the caching."""
        if self.max_bytes <= 0:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        except OSError:
            log.warning("thumbnail not cached", extra={"path": str(path)}, exc_info=True)
            return
        if self._total is None:
            self._total = self._scan()[0]
        else:
            self._total += len(data)
        if self._total > self.max_bytes:
            self._evict()

    def _scan(self) -> tuple[int, list[tuple[float, int, Path]]]:
        entries = []
        for root, _, names in os.walk(self.folder):
            for name in names:
                path = Path(root) / name
                try:
                    stat = path.stat()
                except OSError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
        return sum(size for _, size, _ in entries), entries

    def _evict(self) -> None:
        """Removes the least recently used files until the cache is at 80% of its bound."""
        total, entries = self._scan()
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes * 0.8:
                break
            try:
                path.unlink()
                total -= size
            except OSError:
                pass
        self._total = total


class RenderService:
    def __init__(
        self, retrieve: RetrieveService, blobs: BlobStore, limiter: DecodeLimiter, cache: ThumbnailCache
    ) -> None:
        self.retrieve = retrieve
        self.blobs = blobs
        self.limiter = limiter
        self.cache = cache

    def locate(self, partition: Partition, study: str, series: str | None, sop: str | None) -> StoredInstance:
        """The instance addressed, or the one representing a study or series (see the module docstring)."""
        found = self.retrieve.instances(partition, study, series, sop)
        if sop is not None:
            return found[0]
        for _, members in groupby(found, key=lambda inst: inst.series_uid):
            images = [inst for inst in members if inst.frame_count > 0]
            if images:
                return images[len(images) // 2]
        return found[0]

    @staticmethod
    def etag(inst: StoredInstance, frame: int | None, options: RenderOptions | None, thumbnail: bool = False) -> str:
        """Changes with the instance (its watermark) and with every parameter that changes the output."""
        return f'"{inst.watermark}-{_digest(frame, options, thumbnail)}"'

    # -- images --------------------------------------------------------------------------------------------------
    def image(self, inst: StoredInstance, frame: int | None, options: RenderOptions) -> bytes:
        """The frame (1-based; None for the instance: frame 1, or every frame for a GIF) as an encoded image."""
        if frame is not None and frame > inst.frame_count:
            raise ResourceNotFound(
                NO_PIXEL_DATA if not inst.frame_count else f"The specified frame {frame} cannot be found."
            )
        if not inst.frame_count:
            raise NotAcceptable(NO_PIXELS_TO_RENDER)
        self.limiter.check_file(inst.file_size)
        every_frame = frame is None and options.media_type == GIF
        with self.blobs.open(inst.blob_key) as f:
            try:
                source = render.PixelSource(f)
            except Exception as exc:
                raise self._failed(inst, exc) from exc
            if not source.has_pixel_data():  # image attributes without pixel data: nothing to decode
                raise NotAcceptable(NO_PIXELS_TO_RENDER)
            self.limiter.check_pixels(source.header, frames=None if every_frame else 1)
            with self.limiter.slot():
                try:
                    if every_frame:
                        images = [self._image(each, source.header, options) for each in source.frames()]
                        return render.encode(images, GIF, options.quality, render.frame_time_ms(source.header))
                    image = self._image(source.frame((frame or 1) - 1), source.header, options)
                    return render.encode([image], options.media_type, options.quality)
                except Exception as exc:
                    raise self._failed(inst, exc) from exc

    @staticmethod
    def _image(frame: render.Frame, header: Dataset, options: RenderOptions) -> Image.Image:
        return render.to_image(render.to_display(frame, header, options.window), options.viewport, options.enlarge)

    @staticmethod
    def _failed(inst: StoredInstance, exc: Exception) -> NotAcceptable:
        level = logging.INFO if isinstance(exc, RenderError) else logging.WARNING
        log.log(level, "render failed", extra={"sop_uid": inst.sop_uid, "error": str(exc)[:300]})
        return NotAcceptable(RENDER_FAILED)

    def thumbnail(self, partition: Partition, inst: StoredInstance, frame: int | None, options: RenderOptions) -> bytes:
        """A small image of the frame (frame 1 for an instance), from the cache when it was made before."""
        path = self.cache.path(partition.key, inst.watermark, _digest(frame, options, True), options.media_type)
        cached = self.cache.get(path)
        if cached is not None:
            return cached
        data = self.image(inst, frame, options)
        self.cache.put(path, data)
        return data

    # -- documents and video -------------------------------------------------------------------------------------
    def document(self, inst: StoredInstance) -> tuple[int, Iterator[bytes]]:
        """(length, chunks) of an encapsulated document or video stream, read from the stored file in place: nothing
        is decoded or held in memory, so the transcode size limit does not apply."""
        with self.blobs.open(inst.blob_key) as f:
            try:
                if inst.sop_class_uid in DOCUMENTS:
                    found = render.document_range(f)
                    ranges = [found] if found else None
                else:
                    ranges = render.video_fragments(f)
            except Exception as exc:
                raise self._failed(inst, exc) from exc
        if not ranges:
            raise NotAcceptable(RENDER_FAILED)
        return sum(length for _, length in ranges), self._chunks(inst, ranges)

    def _chunks(self, inst: StoredInstance, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
        for offset, length in ranges:
            yield from self.blobs.iter_range(inst.blob_key, offset, length)
