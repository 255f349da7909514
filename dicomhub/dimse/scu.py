"""The operator's SCU side: send files to a DIMSE peer (C-STORE) and ask a peer to move a study (C-MOVE).

Files go out as they are on disk (their data set streamed from the file, never decoded) when the peer accepts
their transfer syntax; otherwise pynetdicom re-encodes uncompressed data sets to an uncompressed syntax it accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from dicomhub.dimse.retrieve import FALLBACK_SYNTAXES, MAX_CONTEXTS

_ADDRESS = re.compile(r"(?P<aet>[^@\\]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})")


class ScuError(RuntimeError):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True)
class Address:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """``AE@host:port``."""
        found = _ADDRESS.fullmatch(text.strip())
        if found is None or not 0 < int(found["port"]) < 65536:
            raise ValueError(f"'{text}' is not AE@host:port (an AE title of 1-16 characters, a TCP port).")
        return cls(found["aet"], found["host"], int(found["port"]))


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None  # None: not sent (unreadable, or no accepted presentation context)
    detail: str = ""

    @property
    def kind(self) -> str:
        if self.status is None or (self.status & 0xF000) in (0xA000, 0xC000) or self.status in (0x0110, 0x0111):
            return "failed"
        return "warning" if self.status & 0xF000 == 0xB000 else "stored"


def _associate(calling_aet: str, to: Address, contexts: list) -> Association:
    ae = AE(ae_title=calling_aet)
    assoc = ae.associate(to.host, to.port, contexts, ae_title=to.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not reachable"
        raise ScuError(f"The association with {to.ae_title}@{to.host}:{to.port} failed: {reason}.")
    return assoc


def send_files(paths: list[Path], to: Address, calling_aet: str) -> Iterator[SendOutcome]:
    """C-STOREs every file on one association; yields one outcome per file, in order."""
    metas: dict[Path, tuple[str, str]] = {}
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            metas[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except Exception as exc:  # not a DICOM file, or no file meta: reported, the others go on
            yield SendOutcome(path, None, f"not a DICOM file with file meta: {exc}")
    if not metas:
        return
    classes = dict.fromkeys(sop for sop, _ in metas.values())
    contexts = [build_context(sop, [ts]) for sop, ts in dict.fromkeys(metas.values())]
    contexts += [build_context(sop, FALLBACK_SYNTAXES) for sop in classes]
    _config.STORE_SEND_CHUNKED_DATASET = True  # as stored: the data set is read from the file piece by piece
    assoc = _associate(calling_aet, to, contexts[:MAX_CONTEXTS])
    try:
        for path, (sop_class, syntax) in metas.items():
            accepted = [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
            if not accepted:
                yield SendOutcome(path, None, "the peer accepted no presentation context for its SOP class")
                continue
            dataset = path if syntax in accepted else pydicom.dcmread(path)
            try:
                answer = assoc.send_c_store(dataset)
            except Exception as exc:  # no convertible context for this file: the others go on
                yield SendOutcome(path, None, str(exc))
                continue
            if "Status" not in answer:
                yield SendOutcome(path, None, "no answer from the peer (association aborted or timed out)")
                if not assoc.is_established:
                    assoc = _associate(calling_aet, to, contexts[:MAX_CONTEXTS])
                continue
            yield SendOutcome(path, int(answer.Status), str(answer.get("ErrorComment", "") or ""))
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass(frozen=True)
class MoveProgress:
    remaining: int
    completed: int
    failed: int
    warning: int

    @property
    def total(self) -> int:
        return self.remaining + self.completed + self.failed + self.warning


def move(
    source: Address,
    destination_aet: str,
    calling_aet: str,
    study: str,
    series: str | None,
    sops: list[str],
    on_progress: Callable[[MoveProgress], None],
) -> tuple[int, MoveProgress]:
    """Asks ``source`` to C-MOVE a study, series or instances to ``destination_aet``; (final status, counts)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE" if sops else "SERIES" if series else "STUDY"
    identifier.StudyInstanceUID = study
    if series:
        identifier.SeriesInstanceUID = series
    if sops:
        identifier.SOPInstanceUID = sops
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _associate(calling_aet, source, [build_context(model)])
    final, counts = 0xC000, MoveProgress(0, 0, 0, 0)
    try:
        for answer, _ in assoc.send_c_move(identifier, destination_aet, model):
            if "Status" not in answer:
                raise ScuError("The peer stopped answering the C-MOVE (association aborted or timed out).")
            counts = MoveProgress(
                int(answer.get("NumberOfRemainingSuboperations", 0) or 0),
                int(answer.get("NumberOfCompletedSuboperations", 0) or 0),
                int(answer.get("NumberOfFailedSuboperations", 0) or 0),
                int(answer.get("NumberOfWarningSuboperations", 0) or 0),
            )
            final = int(answer.Status)
            on_progress(counts)
    finally:
        if assoc.is_established:
            assoc.release()
    return final, counts
