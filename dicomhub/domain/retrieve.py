"""WADO: find stored instances, stream their files (as stored or transcoded), frames and metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomhub.blobs.base import BlobStore
from dicomhub.config import Settings
from dicomhub.dicom.transcode import UNCOMPRESSED, can_transcode, transcode
from dicomhub.domain.errors import InvalidRequest, NotAcceptable, ResourceNotFound
from dicomhub.index.records import Partition, StoredInstance
from dicomhub.index.repository import Index

ORIGINAL = "*"


def too_large_message(limit: int) -> str:
    return (
        f"Requested DICOM instance size is above the supported limit of {limit}. The entire instance can be "
        "retrieved with the original transfer syntax by specifying 'transfer-syntax=*' in the Accept header."
    )


@dataclass(frozen=True)
class Part:
    """One body part of a response: the syntax it is in and a way to produce its bytes."""

    transfer_syntax: str
    chunks: Iterator[bytes]


class RetrieveService:
    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings

    def instances(
        self, partition: Partition, study: str, series: str | None = None, sop: str | None = None
    ) -> list[StoredInstance]:
        found = self.index.find_instances(partition.key, study, series, sop)
        if not found:
            level = "instance" if sop is not None else "series" if series is not None else "study"
            raise ResourceNotFound(f"The specified {level} cannot be found.")
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
                raise NotAcceptable(
                    f"The instance cannot be transcoded from '{inst.transfer_syntax_uid}' to '{target}'."
                )
            if inst.transfer_syntax_uid != target and inst.file_size > self.settings.max_transcode_size:
                raise NotAcceptable(too_large_message(self.settings.max_transcode_size))

    def file(self, inst: StoredInstance, target: str) -> Part:
        if target == ORIGINAL or target == inst.transfer_syntax_uid:
            return Part(inst.transfer_syntax_uid, self.blobs.iter_range(inst.blob_key))
        with self.blobs.open(inst.blob_key) as f:
            data = transcode(f, target)
        return Part(target, iter([data]))

    # -- frames -------------------------------------------------------------------------------------------------
    def frames(self, inst: StoredInstance, numbers: list[int], target: str) -> list[Part]:
        if not inst.frame_count:
            raise ResourceNotFound("The specified frame cannot be found: the instance has no pixel data.")
        missing = [n for n in numbers if n > inst.frame_count]
        if missing:
            raise ResourceNotFound(f"The specified frame {missing[0]} cannot be found.")
        stored = inst.transfer_syntax_uid
        ranges = json.loads(inst.frames_json) if inst.frames_json else None
        same_bytes = target in (ORIGINAL, stored) or (
            stored in UNCOMPRESSED and UID(stored).is_little_endian and target == ExplicitVRLittleEndian
        )
        if same_bytes and ranges:
            return [Part(stored if target == ORIGINAL else target, self._ranges(inst, ranges[n - 1])) for n in numbers]
        if not can_transcode(stored, ExplicitVRLittleEndian if target == ORIGINAL else target):
            raise NotAcceptable(f"The frames cannot be transcoded from '{stored}' to '{target}'.")
        if inst.file_size > self.settings.max_transcode_size:
            raise NotAcceptable(too_large_message(self.settings.max_transcode_size))
        pixels = self._decoded_frames(inst)
        out = ExplicitVRLittleEndian if target == ORIGINAL else target
        return [Part(out, iter([pixels[n - 1]])) for n in numbers]

    def _ranges(self, inst: StoredInstance, fragments: list[list[int]]) -> Iterator[bytes]:
        for offset, length in fragments:
            yield from self.blobs.iter_range(inst.blob_key, offset, length)

    def _decoded_frames(self, inst: StoredInstance) -> list[bytes]:
        """Native little-endian frame bytes of an uncompressed file stored in another encoding (big endian,
        deflated, or not indexable)."""
        with self.blobs.open(inst.blob_key) as f:
            ds = pydicom.dcmread(f)
        raw = ds.PixelData
        bits = int(ds.BitsAllocated)
        if not UID(inst.transfer_syntax_uid).is_little_endian and bits > 8:
            raw = np.frombuffer(raw, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
        per = len(raw) // max(inst.frame_count, 1)
        return [raw[i * per : (i + 1) * per] for i in range(inst.frame_count)]

    # -- metadata -----------------------------------------------------------------------------------------------
    def metadata_etag(self, partition: Partition, study: str, series: str | None, sop: str | None) -> str:
        watermark, count = self.index.metadata_version(partition.key, study, series, sop)
        if not count:
            level = "instance" if sop is not None else "series" if series is not None else "study"
            raise ResourceNotFound(f"The specified {level} cannot be found.")
        return str(watermark) if sop is not None else f"{watermark}-{count}"

    def metadata(self, partition: Partition, study: str, series: str | None, sop: str | None) -> str:
        """The DICOM JSON array of the scope, assembled from the per-instance JSON written at store time."""
        documents = self.index.metadata(partition.key, study, series, sop)
        if not documents:
            level = "instance" if sop is not None else "series" if series is not None else "study"
            raise ResourceNotFound(f"The specified {level} cannot be found.")
        return "[" + ",".join(documents) + "]"


def parse_frame_numbers(text: str) -> list[int]:
    numbers = []
    for token in text.split(","):
        token = token.strip()
        if not token.lstrip("-").isdigit() or int(token) <= 0:
            raise InvalidRequest(f"The specified frames value '{text}' is not valid. Frame numbers start at 1.")
        numbers.append(int(token))
    return numbers
