"""C-MOVE and C-GET SCP: the instances an identifier names, each sent in its stored transfer syntax when the receiving
side accepted it, else transcoded (``domain/retrieve.py`` and ``dicom/transcode.py``) to a syntax it accepted.

pynetdicom runs the sub-operations and counts them (remaining, completed, warning, failed; the final status is
success, B000 with the Failed SOP Instance UID List, or A702 when all failed). An instance that cannot be sent in
any accepted syntax, or whose file cannot be read, is handed over as a bare data set that pynetdicom cannot send: it
is counted as a failed sub-operation and listed, and the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext, build_context

from dicomhub.dicom.transcode import LOSSY, can_transcode
from dicomhub.dimse.find import IMAGE, PATIENT, SERIES_LEVEL, IdentifierError, query_level, query_value
from dicomhub.domain.attributes import PATIENT_ID, SERIES_UID, SOP_UID, STUDY_UID
from dicomhub.domain.errors import DicomHubError, ResourceNotFound
from dicomhub.domain.query import MAX_LIMIT, SearchRequest
from dicomhub.domain.retrieve import ORIGINAL
from dicomhub.index.records import Partition, QueryFilter, StoredInstance
from dicomhub.services import Services

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
FALLBACK_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def _uids(identifier: Dataset, tag: int) -> list[str]:
    if tag not in identifier:
        return []
    value = query_value(identifier[tag]) or ""
    return [uid.strip() for uid in value.split("\\") if uid.strip()]


def matching_instances(services: Services, partition: Partition, identifier: Dataset, sop_class: str) -> list:
    """The stored instances a retrieve identifier names (unique keys, hierarchical; UID lists allowed)."""
    level = query_level(identifier, sop_class)
    studies = _uids(identifier, STUDY_UID)
    series = set(_uids(identifier, SERIES_UID)) if level in (SERIES_LEVEL, IMAGE) else set()
    sops = set(_uids(identifier, SOP_UID)) if level == IMAGE else set()
    if level == PATIENT:
        patients = _uids(identifier, PATIENT_ID)
        if not patients:
            raise IdentifierError("A PATIENT level retrieve needs a Patient ID.")
        studies = _studies_of(services, partition, QueryFilter(PATIENT_ID, "list", tuple(patients)))
    elif not studies:
        raise IdentifierError("The retrieve identifier needs the Study Instance UID.")
    if level == SERIES_LEVEL and not series:
        raise IdentifierError("A SERIES level retrieve needs Series Instance UIDs.")
    if level == IMAGE and not sops:
        raise IdentifierError("An IMAGE level retrieve needs SOP Instance UIDs.")
    found: list[StoredInstance] = []
    for study in dict.fromkeys(studies):
        try:
            instances = services.retrieve.instances(partition, study)
        except ResourceNotFound:
            continue
        found.extend(
            inst
            for inst in instances
            if (not series or inst.series_uid in series) and (not sops or inst.sop_uid in sops)
        )
    return found


def _studies_of(services: Services, partition: Partition, condition: QueryFilter) -> list[str]:
    search = SearchRequest("studies", 2, filters=[condition], limit=MAX_LIMIT)
    studies: list[str] = []
    while True:
        page = services.query.search(partition, search)
        studies.extend(row[f"{STUDY_UID:08X}"]["Value"][0] for row in page)
        if len(page) < MAX_LIMIT:
            return studies
        search.offset += MAX_LIMIT


def move_contexts(instances: list[StoredInstance]) -> list[PresentationContext]:
    """What to propose to a move destination: each SOP class in the uncompressed syntaxes every receiver must
    accept (the transcoding fallback), and in each stored syntax alone, so that an exact match is possible."""
    classes = dict.fromkeys(i.sop_class_uid for i in instances)
    exact = dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in instances)
    contexts = [build_context(sop, FALLBACK_SYNTAXES) for sop in classes]
    contexts += [build_context(sop, [syntax]) for sop, syntax in exact]
    return contexts[:MAX_CONTEXTS]


def target_syntax(stored: str, accepted: list[str]) -> str | None:
    """The stored syntax when accepted, else the first accepted one it can be transcoded to without loss."""
    if stored in accepted:
        return ORIGINAL
    for syntax in accepted:
        if syntax not in LOSSY and can_transcode(stored, syntax):
            return syntax
    return None


def accepted_syntaxes(contexts: list[PresentationContext], sop_class: str) -> list[str]:
    """Transfer syntaxes this side may send ``sop_class`` in (contexts where it acts as the storage SCU)."""
    return [str(cx.transfer_syntax[0]) for cx in contexts if cx.abstract_syntax == sop_class and cx.as_scu]


def datasets(
    services: Services, instances: list[StoredInstance], contexts: Callable[[], list[PresentationContext]]
) -> Iterator[Dataset]:
    """Each instance as the data set to send (one in memory at a time); ``contexts()`` gives the accepted ones."""
    for inst in instances:
        target = target_syntax(inst.transfer_syntax_uid, accepted_syntaxes(contexts(), inst.sop_class_uid))
        if target is None:
            log.warning(
                "no accepted transfer syntax for a retrieved instance",
                extra={"sop_uid": inst.sop_uid, "transfer_syntax": inst.transfer_syntax_uid},
            )
            yield _unsendable(inst)
            continue
        try:
            yield _read(services, inst, target)
        except (DicomHubError, OSError, ValueError) as exc:
            log.warning("retrieved instance cannot be sent", extra={"sop_uid": inst.sop_uid, "reason": str(exc)})
            yield _unsendable(inst)


def _read(services: Services, inst: StoredInstance, target: str) -> Dataset:
    if target == ORIGINAL:
        with services.blobs.open(inst.blob_key) as f:
            return pydicom.dcmread(f)
    services.retrieve.check_transfer_syntax([inst], target)
    part = services.retrieve.file(inst, target)
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(b"".join(part.chunks)))


def _unsendable(inst: StoredInstance) -> Dataset:
    """A data set without SOP Class UID: pynetdicom refuses to send it, counts a failure and lists the UID."""
    ds = Dataset()
    ds.SOPInstanceUID = inst.sop_uid
    return ds
