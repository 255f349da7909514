"""DIMSE gateway against a real server process (`dicomhub serve` with DICOMHUB_DIMSE_ENABLED): DCMTK's echoscu,
storescu, findscu, movescu, getscu and storescp, pynetdicom as a second client, and Orthanc as a real peer."""

from __future__ import annotations

import io
import json
import random
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.factory import make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server, database_url, free_port
from tests.support.orthanc import ORTHANC, running_orthanc

ENGINES = ["sqlite", "postgres"]
DEFAULT = "Microsoft.Default"
IDLE_TIMEOUT = 3


@dataclass
class Hub:
    server: Server
    http: httpx.Client
    port: int
    move_port: int  # MOVEDEST: a storescp the tests start
    commit_port: int  # COMMITTER: a pynetdicom listener for N-EVENT-REPORTs
    orthanc_port: int  # ORTHANC's DICOM port

    def associate(self, aet: str, contexts: list, **kwargs):
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        return ae.associate("127.0.0.1", self.port, contexts, ae_title="DICOMHUB", **kwargs)

    def studies_path(self, partition: str = DEFAULT) -> str:
        return f"/v2/partitions/{partition}/studies"

    def stow(self, datasets: list[Dataset], partition: str = DEFAULT) -> None:
        content_type, body = multipart([to_bytes(ds) for ds in datasets])
        answer = self.http.post(self.studies_path(partition), content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 200, answer.text

    def stored_file(self, ds: Dataset, partition: str = DEFAULT) -> bytes:
        path = f"{self.studies_path(partition)}/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
        answer = self.http.get(path + ds.SOPInstanceUID, headers={"Accept": "application/dicom; transfer-syntax=*"})
        assert answer.status_code == 200, answer.text
        return answer.content


@pytest.fixture(scope="module", params=ENGINES)
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    data_dir = tmp_path_factory.mktemp(f"dimse-{request.param}")
    port, move_port, commit_port, orthanc_port = (free_port() for _ in range(4))
    local = {"host": "127.0.0.1"}
    peers = {
        "STORESCU": {**local, "port": move_port},
        "MOVEDEST": {**local, "port": move_port, "operations": ["echo", "store"]},
        "COMMITTER": {**local, "port": commit_port},
        "PARTA": {**local, "port": move_port, "partition": "alpha"},
        "PARTB": {**local, "port": move_port, "partition": "beta"},
        "ECHOONLY": {**local, "port": move_port, "operations": ["echo"]},
        "ORTHANC": {**local, "port": orthanc_port},
    }
    peers_file = data_dir / "peers.json"
    data_dir.mkdir(exist_ok=True)
    peers_file.write_text(json.dumps(peers))
    server = Server(
        data_dir,
        database_url(request.param),
        enable_partitions="true",
        dimse_enabled="true",
        dimse_port=str(port),
        dimse_peers=str(peers_file),
        dimse_accept_any="false",
        dimse_idle_timeout=str(IDLE_TIMEOUT),
    ).start()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield Hub(server, http, port, move_port, commit_port, orthanc_port)
    server.stop()


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def write(tmp_path: Path, ds: Dataset, name: str | None = None) -> Path:
    path = tmp_path / (name or f"{ds.SOPInstanceUID}.dcm")
    path.write_bytes(to_bytes(ds))
    return path


def dataset_bytes(file_bytes: bytes) -> bytes:
    """A Part-10 file's data set: everything after its file meta (which each receiver writes itself)."""
    f = io.BytesIO(file_bytes)
    pydicom.filereader.read_preamble(f, False)
    pydicom.filereader._read_file_meta_info(f)
    return file_bytes[f.tell() :]


# -- association policy, C-ECHO --------------------------------------------------------------------------------
def test_echo_from_known_peers_and_unknown_ae_title_refused_with_reason_3(hub: Hub):
    ok = run("echoscu", "-aet", "STORESCU", "-aec", "DICOMHUB", "127.0.0.1", str(hub.port))
    assert ok.returncode == 0, ok.stderr

    refused = run("echoscu", "-v", "-aet", "STRANGER", "-aec", "DICOMHUB", "127.0.0.1", str(hub.port))
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout

    assoc = hub.associate("STRANGER", [build_context(Verification)])
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)


def test_operation_not_granted_to_a_peer_is_refused_0124(hub: Hub):
    assoc = hub.associate("ECHOONLY", [build_context(Verification), build_context(SecondaryCaptureImageStorage)])
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        answer = assoc.send_c_store(make_dataset())
        assert answer.Status == 0x0124
        assert "may not store" in answer.ErrorComment
    finally:
        assoc.release()


# -- C-STORE ---------------------------------------------------------------------------------------------------
def test_storescu_stores_byte_for_byte_and_a_duplicate_is_never_success(hub: Hub, tmp_path: Path):
    ds = make_dataset(PatientName="Dimse^Store")
    path = write(tmp_path, ds)
    sent = run("storescu", "-aet", "STORESCU", "-aec", "DICOMHUB", "127.0.0.1", str(hub.port), str(path))
    assert sent.returncode == 0, sent.stderr
    stored = hub.stored_file(ds)
    assert dataset_bytes(stored) == dataset_bytes(path.read_bytes())
    assert pydicom.dcmread(io.BytesIO(stored)).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = hub.associate("STORESCU", [build_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)])
    try:
        again = assoc.send_c_store(path)  # an identical resend
    finally:
        assoc.release()
    assert again.Status == 0x0111
    assert again.ErrorComment == "Duplicate SOP instance: the first one is kept."
    assert dataset_bytes(hub.stored_file(ds)) == dataset_bytes(stored)


def test_store_statuses_for_missing_uids_invalid_values_and_implicit_vr(hub: Hub, tmp_path: Path):
    no_study = make_dataset(StudyInstanceUID=None)
    no_sop = make_dataset()
    del no_sop.SOPInstanceUID  # the file meta still names it: the C-STORE command carries that UID
    invalid = make_dataset(PatientBirthDate="2024-13-45")
    implicit = make_dataset(transfer_syntax=ImplicitVRLittleEndian)
    other_uid = make_dataset()
    datasets = (no_study, no_sop, invalid, implicit, other_uid)
    paths = [write(tmp_path, ds, f"{n}.dcm") for n, ds in enumerate(datasets)]
    # the file meta's UID (the request's Affected SOP Instance UID) one digit off the data set's
    uid = other_uid.SOPInstanceUID.encode()
    paths[4].write_bytes(paths[4].read_bytes().replace(uid, uid[:-1] + str((int(uid[-1:]) + 1) % 10).encode(), 1))
    _config.STORE_SEND_CHUNKED_DATASET = True
    contexts = [build_context(SecondaryCaptureImageStorage, [ts]) for ts in (ExplicitVRLittleEndian,)]
    contexts.append(build_context(SecondaryCaptureImageStorage, ImplicitVRLittleEndian))
    assoc = hub.associate("STORESCU", contexts)
    try:
        answers = [assoc.send_c_store(p) for p in paths]
    finally:
        assoc.release()
    statuses = [a.Status for a in answers]
    assert statuses == [0xA900, 0xA900, 0xB006, 0x0000, 0xA900]
    assert answers[4].ErrorComment == "SOP Instance UID differs from the C-STORE request."
    assert answers[0].ErrorComment == "(0020,000d) - The required tag '(0020,000d)' is missing."
    assert "(0008,0018)" in answers[1].ErrorComment.upper()
    assert "(0010,0030)" in answers[2].ErrorComment
    # nothing stored for the failures; the warned and implicit instances are there as sent
    for ds in (no_sop, other_uid):
        assert hub.http.get(hub.studies_path(), params={"StudyInstanceUID": ds.StudyInstanceUID}).status_code == 204
    assert dataset_bytes(hub.stored_file(implicit)) == dataset_bytes(paths[3].read_bytes())
    assert dataset_bytes(hub.stored_file(invalid)) == dataset_bytes(paths[2].read_bytes())


def test_compressed_transfer_syntax_negotiated_and_stored_as_sent(hub: Hub, tmp_path: Path):
    ds = make_dataset(rows=32, columns=32)
    ds.compress(RLELossless)
    path = write(tmp_path, ds)
    sent = run("storescu", "-xr", "-aet", "STORESCU", "-aec", "DICOMHUB", "127.0.0.1", str(hub.port), str(path))
    assert sent.returncode == 0, sent.stderr
    stored = hub.stored_file(ds)
    assert pydicom.dcmread(io.BytesIO(stored)).file_meta.TransferSyntaxUID == RLELossless
    assert dataset_bytes(stored) == dataset_bytes(path.read_bytes())


# -- C-FIND ----------------------------------------------------------------------------------------------------
def findscu(hub: Hub, tmp_path: Path, keys: list[str], model: str = "-S", aet: str = "STORESCU") -> list[Dataset]:
    out = tmp_path / f"find-{random.randrange(1 << 30)}"
    out.mkdir()
    args = ["findscu", model, "-X", "-od", str(out), "-aet", aet, "-aec", "DICOMHUB", "127.0.0.1", str(hub.port)]
    for key in keys:
        args[1:1] = ["-k", key]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def qido(hub: Hub, resource: str, params: dict, partition: str = DEFAULT) -> list[dict]:
    answer = hub.http.get(f"/v2/partitions/{partition}/{resource}", params=params)
    assert answer.status_code in (200, 204), answer.text
    return answer.json() if answer.status_code == 200 else []


def test_find_study_series_image_levels_equal_qido(hub: Hub, tmp_path: Path):
    tag = new_uid()[-8:]
    first = make_dataset(
        PatientName=f"Müller^Anna{tag}", StudyDate="20240105", AccessionNumber=f"A{tag}", Modality="CT"
    )
    second = make_dataset(
        study=first.StudyInstanceUID,
        PatientName=first.PatientName,
        PatientID=first.PatientID,
        StudyDate="20240105",
        AccessionNumber=f"A{tag}",
        Modality="CT",
    )
    other = make_dataset(PatientName=f"Meyer^Bob{tag}", StudyDate="20240320", Modality="MR")
    hub.stow([first, second, other])

    # case-insensitive wildcard on names, with return keys filled from the stored metadata and the index counts
    found = findscu(
        hub,
        tmp_path,
        [
            "QueryRetrieveLevel=STUDY",
            f"PatientName=*anna{tag.lower()}",
            "StudyInstanceUID",
            "AccessionNumber",
            "NumberOfStudyRelatedInstances",
            "StudyDate",
        ],
    )
    expected = qido(hub, "studies", {"PatientName": f"*anna{tag.lower()}"})
    assert [d.StudyInstanceUID for d in found] == [s["0020000D"]["Value"][0] for s in expected]
    assert found[0].AccessionNumber == f"A{tag}" and found[0].NumberOfStudyRelatedInstances == 2
    assert str(found[0].PatientName) == f"Müller^Anna{tag}"  # UTF-8 answered as ISO_IR 192

    # a date range and a UID list
    uids = f"{first.StudyInstanceUID}\\{other.StudyInstanceUID}"
    found = findscu(
        hub, tmp_path, ["QueryRetrieveLevel=STUDY", "StudyDate=20240301-20240331", f"StudyInstanceUID={uids}"]
    )
    expected = qido(hub, "studies", {"StudyDate": "20240301-20240331", "StudyInstanceUID": uids.replace("\\", ",")})
    assert [d.StudyInstanceUID for d in found] == [s["0020000D"]["Value"][0] for s in expected]
    assert [d.StudyInstanceUID for d in found] == [other.StudyInstanceUID]

    # series and image levels under the study
    series = findscu(
        hub,
        tmp_path,
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={first.StudyInstanceUID}",
            "SeriesInstanceUID",
            "Modality=CT",
            "NumberOfSeriesRelatedInstances",
        ],
    )
    expected = qido(hub, f"studies/{first.StudyInstanceUID}/series", {"Modality": "CT"})
    assert sorted(d.SeriesInstanceUID for d in series) == sorted(s["0020000E"]["Value"][0] for s in expected)
    images = findscu(
        hub,
        tmp_path,
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={first.StudyInstanceUID}",
            f"SeriesInstanceUID={second.SeriesInstanceUID}",
            "SOPInstanceUID",
            "Rows",
        ],
    )
    assert [(d.SOPInstanceUID, d.Rows) for d in images] == [(second.SOPInstanceUID, 16)]

    # Patient Root, PATIENT level: one answer per patient
    patients = findscu(
        hub,
        tmp_path,
        ["QueryRetrieveLevel=PATIENT", f"PatientName=M*{tag}", "PatientID", "NumberOfPatientRelatedStudies"],
        model="-P",
    )
    assert sorted((d.PatientID, d.NumberOfPatientRelatedStudies) for d in patients) == sorted(
        [(first.PatientID, 1), (other.PatientID, 1)]
    )


def test_find_failures_and_cancel(hub: Hub):
    study, series = new_uid(), new_uid()
    hub.stow([make_dataset(study=study, series=series) for _ in range(120)])
    assoc = hub.associate(
        "STORESCU",
        [
            build_context(StudyRootQueryRetrieveInformationModelFind),
            build_context(PatientRootQueryRetrieveInformationModelFind),
        ],
    )
    assert assoc.is_established
    try:
        bad = Dataset()
        bad.QueryRetrieveLevel = "STUDY"
        bad.StudyDate = "2024-01-01"
        answers = list(assoc.send_c_find(bad, StudyRootQueryRetrieveInformationModelFind))
        assert [a.Status for a, _ in answers] == [0xA900]
        assert "Date" in answers[0][0].ErrorComment

        no_level = Dataset()
        no_level.QueryRetrieveLevel = "PATIENT"  # not in Study Root
        assert next(assoc.send_c_find(no_level, StudyRootQueryRetrieveInformationModelFind))[0].Status == 0xA900

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        query.SOPInstanceUID = ""
        responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind, msg_id=7)
        first_status, _ = next(responses)
        assert first_status.Status == 0xFF00
        assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelFind)
        rest = [s.Status for s, _ in responses]
        assert rest[-1] == 0xFE00
        assert len(rest) < 119
    finally:
        assoc.release()


# -- C-MOVE, C-GET ---------------------------------------------------------------------------------------------
@pytest.fixture
def storescp(hub: Hub, tmp_path: Path) -> Iterator[Path]:
    """A DCMTK storescp as MOVEDEST, accepting every syntax storescu may propose, writing files as received."""
    folder = tmp_path / "received"
    folder.mkdir()
    process = subprocess.Popen(
        ["storescp", "-aet", "MOVEDEST", "+xa", "-od", str(folder), str(hub.move_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", hub.move_port)) == 0:
                break
        time.sleep(0.05)
    yield folder
    process.terminate()
    process.wait(timeout=10)


def test_move_study_into_storescp_byte_for_byte(hub: Hub, storescp: Path, tmp_path: Path):
    study = new_uid()
    plain = [make_dataset(study=study, InstanceNumber=n) for n in range(3)]
    rle = make_dataset(study=study, series=plain[0].SeriesInstanceUID)
    rle.compress(RLELossless)
    hub.stow([*plain, rle])

    moved = run(
        "movescu",
        "-v",
        "-S",
        "-aet",
        "STORESCU",
        "-aec",
        "DICOMHUB",
        "-aem",
        "MOVEDEST",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        str(hub.port),
    )
    assert moved.returncode == 0, moved.stderr
    assert "Received Move Response 4 (Pending)" in moved.stderr and "Final Move Response (Success)" in moved.stderr
    received = {pydicom.dcmread(p).SOPInstanceUID: p.read_bytes() for p in storescp.iterdir()}
    assert set(received) == {ds.SOPInstanceUID for ds in [*plain, rle]}
    for ds in [*plain, rle]:
        assert dataset_bytes(received[ds.SOPInstanceUID]) == dataset_bytes(hub.stored_file(ds))
    assert pydicom.dcmread(io.BytesIO(received[rle.SOPInstanceUID])).file_meta.TransferSyntaxUID == RLELossless

    # the CLI's move asks for the same through a pynetdicom SCU
    for p in storescp.iterdir():
        p.unlink()
    cli = run(
        sys.executable,
        "-m",
        "dicomhub",
        "dimse",
        "move",
        study,
        "--series",
        plain[0].SeriesInstanceUID,
        "--from",
        f"DICOMHUB@127.0.0.1:{hub.port}",
        "--to",
        "MOVEDEST",
        "--aet",
        "STORESCU",
    )
    assert cli.returncode == 0, cli.stderr
    assert "2 completed, 0 warnings, 0 failed" in cli.stderr  # the series of plain[0] and the RLE instance
    assert sorted(pydicom.dcmread(p).SOPInstanceUID for p in storescp.iterdir()) == sorted(
        [plain[0].SOPInstanceUID, rle.SOPInstanceUID]
    )


def test_move_to_unknown_destination_is_a801_and_unknown_study_moves_nothing(hub: Hub):
    assoc = hub.associate("STORESCU", [build_context(StudyRootQueryRetrieveInformationModelMove)])
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = new_uid()
        assert [
            s.Status for s, _ in assoc.send_c_move(query, "NOBODY", StudyRootQueryRetrieveInformationModelMove)
        ] == [0xA801]
        final = list(assoc.send_c_move(query, "MOVEDEST", StudyRootQueryRetrieveInformationModelMove))[-1][0]
        assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 0, 0)
    finally:
        assoc.release()


def get_association(hub: Hub, aet: str, syntaxes: list[str]):
    """A C-GET requestor that accepts Secondary Capture C-STOREs in ``syntaxes`` only, keeping what it receives."""
    received: list[Dataset] = []

    def on_store(event):
        received.append(event.dataset)
        received[-1].file_meta = event.file_meta
        return 0x0000

    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(SecondaryCaptureImageStorage, [syntax]) for syntax in syntaxes]  # one each
    role = build_role(SecondaryCaptureImageStorage, scp_role=True)
    assoc = hub.associate(aet, contexts, ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    return assoc, received


def test_get_counts_transcoding_and_partial_failure(hub: Hub):
    study = new_uid()
    plain = [make_dataset(study=study) for _ in range(2)]
    rle = make_dataset(study=study)
    rle.compress(RLELossless)
    hub.stow([*plain, rle])
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study

    # a requestor that takes explicit VR little endian only: the RLE instance is decoded for it
    assoc, received = get_association(hub, "STORESCU", [ExplicitVRLittleEndian])
    try:
        answers = [s for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert [a.Status for a in answers] == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    assert [a.NumberOfRemainingSuboperations for a in answers[:-1]] == [2, 1, 0]
    assert (answers[-1].NumberOfCompletedSuboperations, answers[-1].NumberOfFailedSuboperations) == (3, 0)
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    assert by_uid[rle.SOPInstanceUID].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    original = make_dataset(rows=16, columns=16)  # the factory's pixels, as in every generated instance
    assert by_uid[rle.SOPInstanceUID].PixelData == original.PixelData

    # one stored file lost: that sub-operation fails, the others complete, the failed UID is listed
    lost = next(hub.server.data_dir.glob(f"blobs/**/{plain[1].SOPInstanceUID}.*.dcm"))
    lost.unlink()
    assoc, received = get_association(hub, "STORESCU", [ExplicitVRLittleEndian, RLELossless])
    try:
        answers = [(s, i) for s, i in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    final, identifier = answers[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert identifier.FailedSOPInstanceUIDList == plain[1].SOPInstanceUID
    by_uid = {ds.SOPInstanceUID: ds for ds in received}
    assert by_uid[rle.SOPInstanceUID].file_meta.TransferSyntaxUID == RLELossless  # accepted: sent as stored


def test_getscu_writes_the_stored_files(hub: Hub, tmp_path: Path):
    ds = make_dataset()
    hub.stow([ds])
    got = run(
        "getscu",
        "-S",
        "-aet",
        "STORESCU",
        "-aec",
        "DICOMHUB",
        "-od",
        str(tmp_path),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        "127.0.0.1",
        str(hub.port),
    )
    assert got.returncode == 0, got.stderr
    [received] = list(tmp_path.glob("*.*"))
    assert dataset_bytes(received.read_bytes()) == dataset_bytes(hub.stored_file(ds))


# -- partitions ------------------------------------------------------------------------------------------------
def test_partitions_isolated_by_calling_ae_title(hub: Hub, tmp_path: Path):
    ds = make_dataset(PatientName="Partition^Alpha")
    path = write(tmp_path, ds)
    cli = run(
        sys.executable,
        "-m",
        "dicomhub",
        "dimse",
        "send",
        str(path),
        "--to",
        f"DICOMHUB@127.0.0.1:{hub.port}",
        "--aet",
        "PARTA",
    )
    assert cli.returncode == 0, cli.stderr
    assert "sent: 1 stored, 0 with warnings, 0 failed" in cli.stderr
    assert dataset_bytes(hub.stored_file(ds, "alpha")) == dataset_bytes(path.read_bytes())
    assert qido(hub, "studies", {"StudyInstanceUID": ds.StudyInstanceUID}) == []

    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    assert [d.StudyInstanceUID for d in findscu(hub, tmp_path, keys, aet="PARTA")] == [ds.StudyInstanceUID]
    assert findscu(hub, tmp_path, keys, aet="PARTB") == []
    assert findscu(hub, tmp_path, keys, aet="STORESCU") == []
    assoc, received = get_association(hub, "PARTB", [ExplicitVRLittleEndian])
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ds.StudyInstanceUID
    try:
        final = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))[-1][0]
    finally:
        assoc.release()
    assert (final.Status, final.NumberOfCompletedSuboperations, received) == (0, 0, [])


# -- storage commitment ----------------------------------------------------------------------------------------
class CommitmentListener:
    """The requesting modality's side: a pynetdicom SCP receiving N-EVENT-REPORTs on ``port``."""

    def __init__(self, port: int) -> None:
        self.reports: list[tuple[int, Dataset]] = []
        self.arrived = threading.Event()
        ae = AE(ae_title="COMMITTER")
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_report)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _on_report(self, event) -> int:
        self.reports.append((event.event_type, event.event_information))
        self.arrived.set()
        return 0x0000


def request_commitment(assoc, references: list[Dataset]) -> tuple[Dataset, Dataset]:
    """(the N-ACTION's answer, its request) asking to commit ``references``."""
    request = Dataset()
    request.TransactionUID = new_uid()
    request.ReferencedSOPSequence = []
    for ds in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        request.ReferencedSOPSequence.append(item)
    try:
        answer, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    finally:
        assoc.release()
    return answer, request


def assert_report(report: Dataset, request: Dataset, committed: list[Dataset], unknown: list[Dataset]) -> None:
    assert report.TransactionUID == request.TransactionUID
    assert [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence] == [d.SOPInstanceUID for d in committed]
    failed = report.get("FailedSOPSequence", [])
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in failed] == [
        (d.SOPInstanceUID, 0x0112) for d in unknown
    ]


def test_storage_commitment_of_stored_and_unknown_instances(hub: Hub):
    stored = make_dataset()
    hub.stow([stored])
    listener = CommitmentListener(hub.commit_port)
    try:
        for references, expected_type in (([stored], 1), ([stored, make_dataset()], 2)):
            listener.arrived.clear()
            answer, request = request_commitment(
                hub.associate("COMMITTER", [build_context(StorageCommitmentPushModel)]), references
            )
            assert answer.Status == 0x0000
            assert listener.arrived.wait(30), "no N-EVENT-REPORT within 30 s"
            event_type, report = listener.reports[-1]
            assert event_type == expected_type
            assert_report(report, request, [stored], references[1:])
    finally:
        listener.server.shutdown()

    # a caller without commitment rights is refused
    answer, _ = request_commitment(hub.associate("ECHOONLY", [build_context(StorageCommitmentPushModel)]), [stored])
    assert answer.Status == 0x0124


@pytest.mark.parametrize("engine", ENGINES)
def test_commitment_report_delivered_after_the_listener_is_killed(engine: str, tmp_path: Path):
    """A request answered, then ``dicomhub dimse`` killed -9 before its report is due: the restarted listener
    sends the report, made from the index then (the stored instance committed, the unknown one failed)."""
    port, commit_port = free_port(), free_port()
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"COMMITTER": {"host": "127.0.0.1", "port": commit_port}}))
    settings = {"dimse_port": str(port), "dimse_peers": str(peers), "dimse_commitment_delay": "4"}
    env = Server(tmp_path / "data", database_url(engine), **settings).env()

    def start_listener() -> subprocess.Popen:
        log = open(tmp_path / "dimse.log", "ab")  # noqa: SIM115 - owned by the child process
        process = subprocess.Popen([sys.executable, "-m", "dicomhub", "dimse"], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            echo = AE(ae_title="COMMITTER").associate("127.0.0.1", port, [build_context(Verification)])
            if echo.is_established:
                echo.release()
                return process
            time.sleep(0.2)
        process.kill()
        raise RuntimeError(f"dicomhub dimse did not start: {(tmp_path / 'dimse.log').read_text()[-3000:]}")

    def associate():
        ae = AE(ae_title="COMMITTER")
        contexts = [build_context(StorageCommitmentPushModel), build_context(SecondaryCaptureImageStorage)]
        return ae.associate("127.0.0.1", port, contexts, ae_title="DICOMHUB")

    stored, unknown = make_dataset(), make_dataset()
    listener = CommitmentListener(commit_port)
    process = start_listener()
    try:
        assoc = associate()
        assert assoc.send_c_store(stored).Status == 0x0000
        answer, request = request_commitment(assoc, [stored, unknown])
        assert answer.Status == 0x0000
        process.kill()  # SIGKILL: nothing of the process's memory survives
        process.wait(30)
        assert not listener.reports
        process = start_listener()
        assert listener.arrived.wait(30), "no N-EVENT-REPORT after the restart"
        time.sleep(1)  # a second report would come at once
        [(event_type, report)] = listener.reports
        assert event_type == 2
        assert_report(report, request, [stored], [unknown])
    finally:
        listener.server.shutdown()
        process.kill()
        process.wait(30)


# -- robustness ------------------------------------------------------------------------------------------------
def test_garbage_truncated_pdu_and_silent_association_cost_one_association(hub: Hub):
    def closed_within(sock: socket.socket, seconds: float) -> bool:
        sock.settimeout(seconds)
        try:
            while sock.recv(4096):
                pass
            return True
        except (TimeoutError, ConnectionResetError):
            return False

    rng = random.Random(14)
    garbage = socket.create_connection(("127.0.0.1", hub.port))
    garbage.sendall(bytes(rng.randrange(256) for _ in range(4096)))
    truncated = socket.create_connection(("127.0.0.1", hub.port))
    truncated.sendall(struct.pack(">BBI", 0x01, 0x00, 2000) + b"\x00\x01" + b"\x00" * 30)  # A-ASSOCIATE-RQ cut short
    silent = hub.associate("STORESCU", [build_context(Verification)])
    assert silent.is_established

    # meanwhile others are served
    echo = run("echoscu", "-aet", "STORESCU", "-aec", "DICOMHUB", "127.0.0.1", str(hub.port))
    assert echo.returncode == 0, echo.stderr
    assert closed_within(garbage, IDLE_TIMEOUT + 10)
    assert closed_within(truncated, IDLE_TIMEOUT + 10)
    deadline = time.monotonic() + IDLE_TIMEOUT + 10
    while silent.is_established and time.monotonic() < deadline:
        time.sleep(0.2)
    assert silent.is_aborted
    garbage.close()
    truncated.close()
    assert run("echoscu", "-aet", "STORESCU", "-aec", "DICOMHUB", "127.0.0.1", str(hub.port)).returncode == 0


# -- Orthanc as a real peer ------------------------------------------------------------------------------------
@pytest.fixture
def orthanc(hub: Hub, tmp_path: Path) -> Iterator[httpx.Client]:
    if not ORTHANC.exists():
        pytest.fail("Orthanc is required (scripts/test.sh installs orthanc)")
    with running_orthanc(
        tmp_path,
        "dimse-peer",
        DicomServerEnabled=True,
        DicomAet="ORTHANC",
        DicomPort=hub.orthanc_port,
        DicomCheckModalityHost=True,
        DicomAlwaysAllowEcho=False,
        DicomAlwaysAllowStore=False,
        DicomCheckCalledAet=False,
        DicomModalities={"dicomhub": ["DICOMHUB", "127.0.0.1", hub.port]},
        OverwriteInstances=False,
        SaveJobs=False,
    ) as client:
        yield client


def test_orthanc_stores_into_dicomhub_finds_and_moves_a_study_out(hub: Hub, orthanc: httpx.Client):
    ds = make_dataset(PatientName="Orthanc^Peer")
    uploaded = orthanc.post("/instances", content=to_bytes(ds))
    assert uploaded.status_code == 200, uploaded.text
    orthanc_id = uploaded.json()["ID"]
    original = orthanc.get(f"/instances/{orthanc_id}/file").content

    # Orthanc's C-STORE SCU into dicomhub (calling AE ORTHANC: a known peer in the default partition)
    store = orthanc.post("/modalities/dicomhub/store", json={"Resources": [orthanc_id], "Synchronous": True})
    assert store.status_code == 200, store.text
    assert dataset_bytes(hub.stored_file(ds)) == dataset_bytes(original)

    # Orthanc's C-FIND SCU
    query = orthanc.post(
        "/modalities/dicomhub/query",
        json={"Level": "Study", "Query": {"StudyInstanceUID": ds.StudyInstanceUID, "PatientName": "orthanc*"}},
    )
    assert query.status_code == 200, query.text
    answers = orthanc.get(f"{query.json()['Path']}/answers?expand").json()
    assert [a["0020,000d"]["Value"] for a in answers] == [ds.StudyInstanceUID]

    # delete it from Orthanc, then Orthanc's C-MOVE SCU moves the study from dicomhub back into Orthanc
    assert orthanc.delete(f"/instances/{orthanc_id}").status_code == 200
    move = orthanc.post(
        "/modalities/dicomhub/move",
        json={
            "Level": "Study",
            "Resources": [{"StudyInstanceUID": ds.StudyInstanceUID}],
            "TargetAet": "ORTHANC",
            "Synchronous": True,
        },
    )
    assert move.status_code == 200, move.text
    back = orthanc.post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": ds.SOPInstanceUID}})
    assert len(back.json()) == 1
    assert dataset_bytes(orthanc.get(f"/instances/{back.json()[0]}/file").content) == dataset_bytes(original)


# -- in-process: policy defaults and TLS -----------------------------------------------------------------------
def test_accept_any_defaults_on_and_off_with_auth(tmp_path: Path):
    from dicomhub.config import Settings
    from dicomhub.dimse.peers import PeerConfigurationError, PeerDirectory

    plain = PeerDirectory(Settings(data_dir=tmp_path))
    assert plain.caller("ANYONE").partition == DEFAULT
    assert "commit" not in plain.caller("ANYONE").operations  # no address to report to
    assert PeerDirectory(Settings(data_dir=tmp_path, auth_enabled=True)).caller("ANYONE") is None
    assert PeerDirectory(Settings(data_dir=tmp_path, auth_enabled=True, dimse_accept_any=True)).caller("X")

    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"CT1": {"host": "ct", "port": 104, "partition": "p1"}}))
    with pytest.raises(PeerConfigurationError, match="needs DICOMHUB_ENABLE_PARTITIONS"):
        PeerDirectory(Settings(data_dir=tmp_path, dimse_peers=peers))
    peers.write_text(json.dumps({"CT1": {"host": "ct", "port": 104, "operations": ["print"]}}))
    with pytest.raises(PeerConfigurationError, match="'operations' must be a list"):
        PeerDirectory(Settings(data_dir=tmp_path, dimse_peers=peers))


def test_tls_when_certificate_and_key_are_configured(tmp_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dicomhub.config import Settings
    from dicomhub.dimse.server import DimseServer
    from dicomhub.services import build_services

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = __import__("datetime").datetime.now(__import__("datetime").UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + __import__("datetime").timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    settings = Settings(
        data_dir=tmp_path / "data",
        dimse_port=0,
        dimse_tls_cert=tmp_path / "cert.pem",
        dimse_tls_key=tmp_path / "key.pem",
        dimse_idle_timeout=IDLE_TIMEOUT,
    )
    server = DimseServer(build_services(settings))
    server.start()
    try:
        client_tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tmp_path / "cert.pem"))
        ae = AE(ae_title="TLSCLIENT")
        assoc = ae.associate(
            "127.0.0.1",
            server.port,
            [build_context(Verification)],
            ae_title="DICOMHUB",
            tls_args=(client_tls, "localhost"),
        )
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        plain = AE(ae_title="PLAIN")
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", server.port, [build_context(Verification)]).is_established
    finally:
        server.shutdown()
        server.services.index.engine.dispose()


# -- Modality Worklist -----------------------------------------------------------------------------------------
def test_modality_worklist_answers_scheduled_workitems(hub: Hub, tmp_path: Path):
    from tests.test_workitems import cancel, new_workitem

    tag = new_uid()[-6:]
    scheduled = new_workitem(
        hub.http,
        "/v2/partitions/Microsoft.Default",
        patient_id=f"MWL{tag}",
        station="CT_MWL",
        accession=f"ACC{tag}",
        start="20240612093000",
    )
    canceled = new_workitem(
        hub.http,
        "/v2/partitions/Microsoft.Default",
        patient_id=f"MWL{tag}",
        station="CT_MWL",
        accession=f"ACX{tag}",
        start="20240612110000",
    )
    assert cancel(hub.http, canceled, base="/v2/partitions/Microsoft.Default").status_code == 202
    keys = [
        f"PatientID=MWL{tag}",
        "PatientName",
        "AccessionNumber",
        "StudyInstanceUID",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT_MWL",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20240612",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepSequence[0].Modality",
    ]
    found = findscu(hub, tmp_path, keys, model="-W")
    assert [d.AccessionNumber for d in found] == [f"ACC{tag}"]
    [answer] = found
    step = answer.ScheduledProcedureStepSequence[0]
    assert (str(answer.PatientName), answer.StudyInstanceUID) == ("Last^First", "1.2.3.4.5")
    assert answer.RequestedProcedureDescription == "Requested procedure description"
    assert (step.ScheduledStationAETitle, step.Modality) == ("CT_MWL", "CLASS")
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == ("20240612", "093000")
    assert scheduled  # the other day's and other stations' items are not answered
    assert (
        findscu(
            hub,
            tmp_path,
            [f"PatientID=MWL{tag}", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20240613"],
            model="-W",
        )
        == []
    )


def test_serve_with_two_workers_binds_the_listener_once(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    data_dir = tmp_path_factory.mktemp("dimse-workers")
    settings = {"workers": "2", "dimse_enabled": "true", "dimse_port": str(port), "dimse_accept_any": "true"}
    server = Server(data_dir, None, **settings).start()
    try:
        echo = run("echoscu", "-aet", "ANYONE", "-aec", "DICOMHUB", "127.0.0.1", str(port))
        log = server.log_path.read_text()
    finally:
        server.stop()
    messages = [json.loads(line).get("message") for line in log.splitlines() if line.startswith("{")]
    assert messages.count("DIMSE listener started") == 1
    assert "Address already in use" not in log
    assert echo.returncode == 0, echo.stderr
