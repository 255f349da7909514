"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION asks whether the archive holds instances; the answer
is an N-EVENT-REPORT (event type 1: all committed; 2: some failed, each with Failure Reason 0112 "no such object
instance", or 0119 when the SOP class differs from the stored one).

The report goes on a new association to the requesting peer's host and port (the standard allows either that or
the same association; modalities must accept both). It is sent from a background thread, retried until 30 s after
the request; a report the archive could not deliver is logged, and the modality asks again after its own timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_context, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomhub.dimse.peers import Peer
from dicomhub.domain.attributes import SOP_CLASS_UID, SOP_UID
from dicomhub.domain.query import MAX_LIMIT, SearchRequest
from dicomhub.index.records import Partition, QueryFilter
from dicomhub.services import Services

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # PS3.4 J.3.5: the Storage Commitment Push Model SOP Instance
REQUEST_COMMITMENT = 1  # the only N-ACTION type of the SOP class
ALL_COMMITTED, SOME_FAILED = 1, 2
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
REPORT_DEADLINE_SECONDS = 30.0
RETRY_SECONDS = 2.0


class CommitmentRequestError(ValueError):
    """The N-ACTION's information cannot be understood."""


def requested_references(action: Dataset) -> tuple[str, list[tuple[str, str]]]:
    """(Transaction UID, [(SOP class, SOP instance)]) of an N-ACTION's Action Information."""
    transaction = str(action.get("TransactionUID", "") or "").strip()
    items = action.get("ReferencedSOPSequence")
    if not transaction or not items:
        raise CommitmentRequestError("The request needs a Transaction UID and a Referenced SOP Sequence.")
    references = []
    for item in items:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_uid:
            raise CommitmentRequestError("Each referenced SOP needs its SOP Class and SOP Instance UIDs.")
        references.append((sop_class, sop_uid))
    return transaction, references


def commitment_report(
    services: Services, partition: Partition | None, transaction: str, references: list[tuple[str, str]]
) -> tuple[int, Dataset]:
    """(event type, Event Information) for the requested instances, as the index holds them now."""
    stored = _stored_classes(services, partition, [sop for _, sop in references]) if partition else {}
    report = Dataset()
    report.TransactionUID = transaction
    committed, failed = [], []
    for sop_class, sop_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        if sop_uid not in stored:
            item.FailureReason = NO_SUCH_OBJECT_INSTANCE
            failed.append(item)
        elif stored[sop_uid] != sop_class:
            item.FailureReason = CLASS_INSTANCE_CONFLICT
            failed.append(item)
        else:
            committed.append(item)
    if committed:
        report.ReferencedSOPSequence = Sequence(committed)
    if failed:
        report.FailedSOPSequence = Sequence(failed)
    return (SOME_FAILED if failed else ALL_COMMITTED), report


def _stored_classes(services: Services, partition: Partition, sop_uids: list[str]) -> dict[str, str]:
    """SOP instance UID -> stored SOP class UID, for those of ``sop_uids`` the partition holds (QIDO's index)."""
    found: dict[str, str] = {}
    unique = list(dict.fromkeys(sop_uids))
    for start in range(0, len(unique), MAX_LIMIT):
        batch = tuple(unique[start : start + MAX_LIMIT])
        search = SearchRequest("instances", 2, filters=[QueryFilter(SOP_UID, "list", batch)], limit=MAX_LIMIT)
        search.include = {SOP_CLASS_UID}
        for row in services.query.search(partition, search):
            sop = row[f"{SOP_UID:08X}"]["Value"][0]
            found[sop] = (row.get(f"{SOP_CLASS_UID:08X}", {}).get("Value") or [""])[0]
    return found


class CommitmentReporter:
    """Sends reports on new associations to the peers, from a small pool of threads."""

    def __init__(self, ae_title: str, threads: int = 2) -> None:
        self.ae_title = ae_title
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dimse-commitment")
        self._stopping = threading.Event()

    def submit(self, peer: Peer, event_type: int, report: Dataset) -> None:
        self.pool.submit(self._deliver, peer, event_type, report, time.monotonic() + REPORT_DEADLINE_SECONDS)

    def shutdown(self) -> None:
        self._stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _deliver(self, peer: Peer, event_type: int, report: Dataset, deadline: float) -> None:
        while not self._stopping.is_set():
            try:
                if self._send(peer, event_type, report):
                    log.info("storage commitment report sent", extra={"peer": peer.ae_title, "event": event_type})
                    return
            except Exception:
                log.warning("storage commitment report failed", extra={"peer": peer.ae_title}, exc_info=True)
            if time.monotonic() + RETRY_SECONDS > deadline:
                break
            self._stopping.wait(RETRY_SECONDS)
        log.error(
            "storage commitment report not delivered",
            extra={"peer": peer.ae_title, "transaction": str(report.TransactionUID)},
        )

    def _send(self, peer: Peer, event_type: int, report: Dataset) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        context = build_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)  # we report: the SCP role
        assoc = ae.associate(peer.host, peer.port, [context], ae_title=peer.ae_title, ext_neg=[role])
        if not assoc.is_established:
            return False
        try:
            answer, _ = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
            return answer is not None and "Status" in answer and answer.Status == 0
        finally:
            assoc.release()
