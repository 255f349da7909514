"""The DIMSE listener: one pynetdicom Application Entity, its association policy and the service handlers.

Association policy: a calling AE title listed in ``DICOMHUB_DIMSE_PEERS`` is served in its partition with its
operations; any other is refused with A-ASSOCIATE-RJ (rejected-permanent, source 1 service user, reason 3 calling AE
title not recognised) unless ``DICOMHUB_DIMSE_ACCEPT_ANY`` (default partition; no commitment, which needs an
address). An operation a peer may not use answers 0124 (Refused: Not Authorized).

Each association runs in its own thread; at most ``DICOMHUB_DIMSE_MAX_ASSOCIATIONS`` at once (more are refused,
transient, local limit exceeded). An association silent for ``DICOMHUB_DIMSE_IDLE_TIMEOUT`` is aborted, so garbage
on the port, a truncated PDU or a peer that never releases costs one association thread until then, never the
process. TLS (PS3.15 B.1) when a certificate and key are configured; with a CA bundle, callers need a certificate.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicomhub.config import Settings
from dicomhub.dimse.commitment import (
    REQUEST_COMMITMENT,
    CommitmentReporter,
    CommitmentRequestError,
    requested_references,
)
from dicomhub.dimse.find import IdentifierError, find, identifier_failure
from dicomhub.dimse.peers import Caller, PeerDirectory
from dicomhub.dimse.retrieve import datasets, matching_instances, move_contexts
from dicomhub.dimse.status import (
    CANCEL,
    IDENTIFIER_MISMATCH,
    NO_SUCH_ACTION,
    OUT_OF_RESOURCES,
    PENDING,
    PROCESSING_FAILURE,
    SUCCESS,
    not_authorized,
    status,
)
from dicomhub.dimse.store import command_mismatch, store_received, store_status
from dicomhub.dimse.worklist import worklist
from dicomhub.index.records import Partition
from dicomhub.services import Services

log = logging.getLogger(__name__)

MAX_PDU = 262144  # what peers may send us per PDU: fewer, bigger PDUs cost less per byte in Python
REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03
# The acceptor's order decides among the syntaxes a context proposes: explicit VR little endian first, so that what
# was stored in it goes out byte for byte on C-GET, and a modality offering it besides a lossy one sends lossless.
STORAGE_SYNTAXES = [ExplicitVRLittleEndian, *(ts for ts in AllTransferSyntaxes if ts != ExplicitVRLittleEndian)]
FIND_MODELS = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
MOVE_MODELS = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)
GET_MODELS = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)


class DimseConfigurationError(ValueError):
    """The DIMSE settings cannot be used; the listener must not start."""


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server side of PS3.15's TLS secure transport, or ``None`` without a certificate."""
    if settings.dimse_tls_cert is None and settings.dimse_tls_key is None:
        return None
    if settings.dimse_tls_cert is None or settings.dimse_tls_key is None:
        raise DimseConfigurationError("DIMSE TLS needs both DICOMHUB_DIMSE_TLS_CERT and DICOMHUB_DIMSE_TLS_KEY.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.dimse_tls_cert, settings.dimse_tls_key)
    if settings.dimse_tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(settings.dimse_tls_ca)
    return context


class DimseServer:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.peers = PeerDirectory(self.settings)
        self.reporter = CommitmentReporter(
            services, self.peers, self.settings.dimse_aet, self.settings.dimse_commitment_delay
        )
        self.ae = self._application_entity()
        self._tls = tls_context(self.settings)
        self._server = None
        self._partitions: dict[str, Partition] = {}
        self._partitions_lock = threading.Lock()

    def _application_entity(self) -> AE:
        _config.STORE_RECV_CHUNKED_DATASET = True  # C-STORE data sets go to a file as they arrive (store.py)
        ae = AE(ae_title=self.settings.dimse_aet)
        ae.maximum_associations = self.settings.dimse_max_associations
        ae.maximum_pdu_size = MAX_PDU
        # one bound on every wait: for the A-ASSOCIATE-RQ after connecting (garbage, a truncated PDU), for the next
        # PDU of an association (one that never releases), for a DIMSE answer of a move destination
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.dimse_idle_timeout
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:  # C-STORE in, and C-GET's C-STOREs out (SCP/SCU roles)
            ae.add_supported_context(context.abstract_syntax, STORAGE_SYNTAXES, scu_role=True, scp_role=True)
        for model in (*FIND_MODELS, ModalityWorklistInformationFind, *MOVE_MODELS, *GET_MODELS):
            ae.add_supported_context(model)
        ae.add_supported_context(StorageCommitmentPushModel)
        return ae

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        """Binds and serves in background threads."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_N_ACTION, self._on_commitment),
        ]
        address = (self.settings.dimse_host, self.settings.dimse_port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=self._tls)
        # accepted sockets inherit it: a C-STORE response is one small PDU, sent at once rather than after Nagle
        self._server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reporter.start()
        log.info(
            "DIMSE listener started",
            extra={"aet": self.settings.dimse_aet, "address": f"{address[0]}:{self.port}", "tls": bool(self._tls)},
        )

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.reporter.shutdown()

    # -- association policy ------------------------------------------------------------------------------------
    def _on_connection(self, event: evt.Event) -> None:
        """Bounds the two waits pynetdicom leaves open on an accepted connection by the idle timeout: the fixed 30 s
        (ARTIM) for a peer to close after an abort or reject (one sending garbage), and the read of the rest of a
        PDU, which blocks without a socket timeout (a truncated PDU would hold its thread for ever)."""
        idle = self.settings.dimse_idle_timeout
        event.assoc.dul.artim_timer.timeout = idle
        event.assoc.dul.socket.socket.settimeout(idle)

    def _on_requested(self, event: evt.Event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title
        if self.peers.caller(calling) is None:
            log.warning("DIMSE association refused: unknown calling AE title", extra={"calling_aet": calling})
            event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
            event.assoc.kill()  # as pynetdicom's own rejections: returns once the A-ASSOCIATE-RJ is out

    def _caller(self, event: evt.Event) -> Caller | None:
        return self.peers.caller(event.assoc.requestor.ae_title)

    def _partition(self, name: str, create: bool = False) -> Partition | None:
        """The caller's partition (cached: partitions are never removed); only a store creates one."""
        with self._partitions_lock:
            found = self._partitions.get(name)
        if found is None:
            index = self.services.index
            found = index.ensure_partition(name) if create else index.get_partition(name)
            if found is not None:
                with self._partitions_lock:
                    self._partitions[name] = found
        return found

    # -- services -----------------------------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> Dataset:
        caller = self._caller(event)
        return status(SUCCESS) if caller and "echo" in caller.operations else not_authorized("echo")

    def _on_store(self, event: evt.Event) -> Dataset:
        caller = self._caller(event)
        if caller is None or "store" not in caller.operations:
            return not_authorized("store")
        request = event.request
        mismatch = command_mismatch(event.dataset_path, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID)
        if mismatch is not None:
            return status(IDENTIFIER_MISMATCH, mismatch)
        try:
            result = store_received(self.services, self._partition(caller.partition, create=True), event.dataset_path)
        except Exception:
            log.exception("C-STORE failed", extra={"calling_aet": caller.ae_title})
            return status(OUT_OF_RESOURCES, "The archive could not store the instance.")
        log.info(
            "C-STORE",
            extra={"calling_aet": caller.ae_title, "sop_uid": result.sop_uid, "failure": result.failure},
        )
        return store_status(result)

    def _on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        caller = self._caller(event)
        if caller is None or "find" not in caller.operations:
            yield not_authorized("find"), None
            return
        partition = self._partition(caller.partition)
        if partition is None:
            return  # nothing stored for this caller yet: no matches
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            if sop_class == ModalityWorklistInformationFind:
                replies = worklist(self.services, partition, event.identifier)
            else:
                replies = find(self.services, partition, event.identifier, sop_class, self.settings.dimse_aet)
            for reply in replies:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                yield PENDING, reply
        except IdentifierError as exc:
            yield identifier_failure(exc), None

    def _retrieve_plan(self, event: evt.Event, caller: Caller | None, operation: str) -> tuple[list, Dataset | None]:
        """(instances, None) or ([], the failure status) of a C-MOVE/C-GET request."""
        if caller is None or operation not in caller.operations:
            return [], not_authorized(operation)
        partition = self._partition(caller.partition)
        if partition is None:
            return [], None
        try:
            sop_class = str(event.request.AffectedSOPClassUID)
            return matching_instances(self.services, partition, event.identifier, sop_class), None
        except IdentifierError as exc:
            return [], identifier_failure(exc)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self.peers.destination(str(event.move_destination or "").strip())
        if destination is None:
            yield None, None  # A801: Move Destination unknown
            return
        instances, failure = self._retrieve_plan(event, self._caller(event), "move")
        store_association: list = []
        options = {
            "contexts": move_contexts(instances) or [build_context(Verification)],
            # captured before the association counts as established, so before the first data set is chosen
            "evt_handlers": [(evt.EVT_ACCEPTED, lambda accepted: store_association.append(accepted.assoc))],
        }
        yield destination.host, destination.port, options
        if failure is not None:
            yield 1
            yield failure, None
            return
        yield len(instances)

        def contexts() -> list:
            return store_association[0].accepted_contexts if store_association else []

        yield from _sub_operations(event, datasets(self.services, instances, contexts))

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        instances, failure = self._retrieve_plan(event, self._caller(event), "get")
        if failure is not None:
            yield 1
            yield failure, None
            return
        yield len(instances)
        yield from _sub_operations(event, datasets(self.services, instances, lambda: event.assoc.accepted_contexts))

    def _on_commitment(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        caller = self._caller(event)
        if caller is None or caller.peer is None or "commit" not in caller.operations:
            return not_authorized("request storage commitment"), None
        if event.action_type != REQUEST_COMMITMENT:
            return status(NO_SUCH_ACTION, "Only action type 1 (Request Storage Commitment)."), None
        try:
            transaction, references = requested_references(event.action_information)
        except CommitmentRequestError as exc:
            return status(PROCESSING_FAILURE, str(exc)), None
        try:
            self.reporter.submit(caller, transaction, references)
        except Exception:
            log.exception("storage commitment request not recorded", extra={"calling_aet": caller.ae_title})
            return status(PROCESSING_FAILURE, "The archive could not record the request."), None
        log.info(
            "storage commitment requested",
            extra={"calling_aet": caller.ae_title, "instances": len(references), "transaction": transaction},
        )
        return status(SUCCESS), None


def _sub_operations(event: evt.Event, outgoing: Iterator[Dataset]) -> Iterator[tuple[int, Dataset | None]]:
    """Pending (status, data set) pairs for pynetdicom's C-STORE sub-operations, until the peer cancels."""
    for ds in outgoing:
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield PENDING, ds
