"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION asks whether the archive holds instances; the answer
is an N-EVENT-REPORT (event type 1: all committed; 2: some failed, each with Failure Reason 0112 "no such object
instance", or 0119 when the SOP class differs from the stored one).

The report goes on a new association to the requesting peer's host and port (the standard allows either that or
the same association; modalities must accept both), ``DICOMHUB_DIMSE_COMMITMENT_DELAY`` after the request. The
request is kept in the index until its report is delivered (``index/commitments.py``), so a listener restarted in
between still sends it; retried every 2 s for 30 s, then every 30 s for an hour, then logged as not delivered.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_context, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomhub.dimse.peers import Caller, Peer, PeerDirectory
from dicomhub.domain.attributes import SOP_CLASS_UID, SOP_UID
from dicomhub.domain.query import MAX_LIMIT, SearchRequest
from dicomhub.index.commitments import PendingCommitment
from dicomhub.index.records import Partition, QueryFilter
from dicomhub.services import Services

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # PS3.4 J.3.5: the Storage Commitment Push Model SOP Instance
REQUEST_COMMITMENT = 1  # the only N-ACTION type of the SOP class
ALL_COMMITTED, SOME_FAILED = 1, 2
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
REPORT_DEADLINE_SECONDS = 30.0  # retried every RETRY_SECONDS until then, every LATE_RETRY_SECONDS after
RETRY_SECONDS = 2.0
LATE_RETRY_SECONDS = 30.0
REPORT_EXPIRY_SECONDS = 3600.0  # a peer unreachable that long has asked again under a new transaction
SEND_TIMEOUT_SECONDS = 10
DELIVERY_LEASE_SECONDS = 4 * SEND_TIMEOUT_SECONDS  # longer than one try (associate, report, release)
IDLE_POLL_SECONDS = 30.0


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
    """Delivers the reports of the requests pending in the index: one thread wakes when the next is due, a small
    pool sends them. A report is made when it is sent (from the index then), so an instance deleted meanwhile is
    reported failed, never committed."""

    def __init__(self, services: Services, peers: PeerDirectory, ae_title: str, delay: float, threads: int = 2) -> None:
        self.services = services
        self.peers = peers
        self.ae_title = ae_title
        self.delay = timedelta(seconds=delay)
        self.pending = services.storage_commitments
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dimse-commitment")
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="dimse-commitment-scheduler", daemon=True)

    def start(self) -> None:
        """Starts delivering, first what an earlier process left pending."""
        self._scheduler.start()

    def submit(self, caller: Caller, transaction: str, references: list[tuple[str, str]]) -> None:
        """Records the request durably (before the N-ACTION is answered) and wakes the scheduler."""
        due = datetime.now(UTC) + self.delay
        self.pending.add(caller.ae_title, caller.partition, transaction, references, due)
        self._wake.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._scheduler.is_alive():
            self._scheduler.join()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _schedule(self) -> None:
        while not self._stopping.is_set():
            wait = IDLE_POLL_SECONDS
            try:
                now = datetime.now(UTC)
                for pending in self.pending.claim_due(now, timedelta(seconds=DELIVERY_LEASE_SECONDS)):
                    self.pool.submit(self._deliver, pending)
                next_due = self.pending.next_due()
                if next_due is not None:
                    wait = min(wait, max((next_due - datetime.now(UTC)).total_seconds(), 0.0))
            except Exception:
                log.exception("storage commitment scheduling failed")
                wait = RETRY_SECONDS
            self._wake.wait(wait)
            self._wake.clear()

    def _deliver(self, pending: PendingCommitment) -> None:
        context = {"peer": pending.calling_aet, "transaction": pending.transaction_uid}
        age = (datetime.now(UTC) - pending.created_at).total_seconds()
        try:
            peer = self.peers.destination(pending.calling_aet)
            if peer is None or age > REPORT_EXPIRY_SECONDS:
                reason = "the peer is no longer known" if peer is None else "expired"
                log.error("storage commitment report not delivered: " + reason, extra=context)
                self.pending.remove(pending.key)
                return
            partition = self.services.index.get_partition(pending.partition_name)
            event_type, report = commitment_report(
                self.services, partition, pending.transaction_uid, pending.references
            )
            if self._send(peer, event_type, report):
                self.pending.remove(pending.key)
                log.info("storage commitment report sent", extra={**context, "event": event_type})
                return
        except Exception:
            log.warning("storage commitment report failed", extra=context, exc_info=True)
        retry = RETRY_SECONDS if age < REPORT_DEADLINE_SECONDS else LATE_RETRY_SECONDS
        try:
            self.pending.reschedule(pending.key, datetime.now(UTC) + timedelta(seconds=retry))
        except Exception:  # the lease runs out instead: it is tried again then
            log.warning("storage commitment report not rescheduled", extra=context, exc_info=True)
        self._wake.set()

    def _send(self, peer: Peer, event_type: int, report: Dataset) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SEND_TIMEOUT_SECONDS
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
