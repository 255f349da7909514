"""DICOMcast against a real FHIR R4 server (npm @medplum/fhir-router behind tests/support/fhir/server.mjs).

``cast_archive`` runs the cast inside ``dicomhub serve`` (DICOMHUB_CAST_ENABLED, partitions on); ``plain_archive``
has no cast of its own: ``dicomhub cast`` processes follow it (local index, or over HTTP with --dicomweb-url).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomhub.cast.fhir import MAX_BACKOFF_SECONDS
from tests.conftest import ENGINES, start_server
from tests.factory import WITHOUT_IMAGE, make_dataset, multipart, new_uid, to_bytes
from tests.servers import Server
from tests.support.fhir import FhirServer
from tests.support.oidc.provider import auth_mode, shared_provider

DEFAULT = "Microsoft.Default"
DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
CAST = {"cast_poll_seconds": "0.2", "cast_lease_seconds": "2"}


@pytest.fixture(scope="session")
def fhir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    server = FhirServer(tmp_path_factory.mktemp("fhir") / "fhir.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=ENGINES)
def cast_archive(request, tmp_path_factory, fhir: FhirServer) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory, request.param, enable_partitions="true", cast_enabled="true", cast_fhir_url=fhir.url, **CAST
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=ENGINES)
def plain_archive(request, tmp_path_factory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory, request.param)
    yield srv
    srv.stop()


def wait_for(check: Callable[[], object], timeout: float = 30, what: str = "the cast") -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def store(archive: Server, datasets: list[Dataset], partition: str | None = DEFAULT, status: int = 200) -> None:
    content_type, body = multipart([to_bytes(ds) for ds in datasets])
    prefix = f"/v2/partitions/{partition}" if partition else "/v2"
    response = httpx.post(f"{archive.url}{prefix}/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text


def studies(fhir: FhirServer, study_uid: str) -> list[dict]:
    return fhir.search("ImagingStudy", identifier=f"{DICOM_UID}|urn:oid:{study_uid}")


def study_with(fhir: FhirServer, study_uid: str, instances: int, timeout: float = 30) -> dict:
    def ready():
        found = studies(fhir, study_uid)
        return found[0] if found and found[0].get("numberOfInstances") == instances else None

    return wait_for(ready, timeout, f"ImagingStudy {study_uid} with {instances} instances")


def patients(fhir: FhirServer, patient_id: str) -> list[dict]:
    return fhir.search("Patient", identifier=patient_id)


def cast_env(archive: Server, fhir_url: str, **settings: str) -> dict[str, str]:
    env = archive.env()
    for key, value in {"cast_fhir_url": fhir_url, **CAST, **settings}.items():
        env[f"DICOMHUB_{key.upper()}"] = value
    return env


def start_cast(archive: Server, fhir_url: str, *args: str, **settings: str) -> subprocess.Popen:
    log = open(archive.data_dir / "cast.log", "ab")  # noqa: SIM115 - owned by the child process
    return subprocess.Popen(
        [sys.executable, "-m", "dicomhub", "cast", *args],
        env=cast_env(archive, fhir_url, **settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def cast_status(archive: Server, fhir_url: str, *args: str, **settings: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "dicomhub", "cast", "--status", *args],
        env=cast_env(archive, fhir_url, **settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def stop_cast(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# -- mapping --------------------------------------------------------------------------------------------------------
def test_study_with_two_series_and_a_second_study_of_the_patient(cast_archive: Server, fhir: FhirServer):
    study, series_a, series_b, patient_id = new_uid(), new_uid(), new_uid(), f"PID-{new_uid()[-10:]}"
    common = dict(
        PatientID=patient_id,
        PatientName="Doe^John Quincy^Q^Dr^Jr",
        PatientSex="F",
        PatientBirthDate="19800214",
        StudyDate="20240102",
        StudyTime="103000",
        TimezoneOffsetFromUTC="+0200",
        AccessionNumber="ACC-1",
        StudyDescription="Chest",
    )
    datasets = [
        make_dataset(
            study, series_a, SeriesNumber=1, SeriesDescription="axial", InstanceNumber=1, Modality="CT", **common
        ),
        make_dataset(
            study, series_a, SeriesNumber=1, SeriesDescription="axial", InstanceNumber=2, Modality="CT", **common
        ),
        make_dataset(study, series_b, SeriesNumber=2, InstanceNumber=1, Modality="OT", **common),
    ]
    store(cast_archive, datasets)
    imaging = study_with(fhir, study, 3)

    base = f"{cast_archive.url}/v2/partitions/{DEFAULT}"
    assert imaging["status"] == "available"
    assert {"system": DICOM_UID, "value": f"urn:oid:{study}"} in imaging["identifier"]
    assert {"type": ACSN, "value": "ACC-1"} in imaging["identifier"]
    assert imaging["meta"]["source"] == base
    assert imaging["started"] == "2024-01-02T10:30:00+02:00"
    assert imaging["numberOfSeries"] == 2 and imaging["numberOfInstances"] == 3
    assert imaging["note"] == [{"text": "Chest"}]
    assert {"system": DCM, "code": "CT"} in imaging["modality"] and {"system": DCM, "code": "OT"} in imaging["modality"]
    series = {s["uid"]: s for s in imaging["series"]}
    assert series[series_a]["number"] == 1 and series[series_a]["description"] == "axial"
    assert series[series_a]["modality"] == {"system": DCM, "code": "CT"}
    assert series[series_a]["numberOfInstances"] == 2 and series[series_b]["numberOfInstances"] == 1
    instances = {i["uid"]: i for i in series[series_a]["instance"]}
    assert {i["number"] for i in instances.values()} == {1, 2}
    assert instances[datasets[0].SOPInstanceUID]["sopClass"]["code"] == f"urn:oid:{datasets[0].SOPClassUID}"

    endpoint_id = imaging["endpoint"][0]["reference"].split("/")[1]
    endpoint = fhir.read("Endpoint", endpoint_id).json()
    assert endpoint["address"] == base and endpoint["name"] == f"DICOM WADO-RS endpoint {base}"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs" and endpoint["status"] == "active"

    [patient] = patients(fhir, patient_id)
    assert imaging["subject"]["reference"] == f"Patient/{patient['id']}"
    assert patient["identifier"] == [{"value": patient_id}]
    assert patient["name"] == [
        {"use": "usual", "family": "Doe", "given": ["John", "Quincy", "Q"], "prefix": ["Dr"], "suffix": ["Jr"]}
    ]
    assert patient["gender"] == "female" and patient["birthDate"] == "1980-02-14"

    second = new_uid()
    store(cast_archive, [make_dataset(second, **{**common, "StudyDate": "20230305", "StudyTime": None})])
    other = study_with(fhir, second, 1)
    assert other["started"] == "2023-03-05"
    assert other["subject"] == imaging["subject"]
    assert len(patients(fhir, patient_id)) == 1


def update_study(archive: Server, study: str, change: dict) -> None:
    prefix = f"{archive.url}/v2/partitions/{DEFAULT}"
    started = httpx.post(
        f"{prefix}/studies/$bulkUpdate", json={"studyInstanceUids": [study], "changeDataset": change}, timeout=60
    )
    assert started.status_code == 202, started.text

    def done():
        answer = httpx.get(started.json()["href"], timeout=30)
        return answer.status_code == 200 and answer.json()

    assert wait_for(done, 60, "the bulk update")["status"] == "succeeded"


def test_bulk_update_updates_the_patient_in_place(cast_archive: Server, fhir: FhirServer):
    study, patient_id = new_uid(), f"PID-{new_uid()[-10:]}"
    store(cast_archive, [make_dataset(study, PatientID=patient_id, PatientName="Before^Name", StudyDescription="one")])
    study_with(fhir, study, 1)
    [before] = patients(fhir, patient_id)

    update_study(
        cast_archive,
        study,
        {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "After^Name"}]}, "00081030": {"vr": "LO", "Value": ["two"]}},
    )

    def renamed():
        found = patients(fhir, patient_id)
        return found if found and found[0]["name"][0].get("family") == "After" else None

    [after] = wait_for(renamed, what="the Patient renamed")
    assert after["id"] == before["id"] and after["meta"]["versionId"] != before["meta"]["versionId"]
    assert after["name"] == [{"use": "usual", "family": "After", "given": ["Name"]}]
    imaging = wait_for(lambda: [s for s in studies(fhir, study) if len(s.get("note", [])) == 2], what="notes")[0]
    assert imaging["note"] == [{"text": "one"}, {"text": "two"}] and imaging["numberOfInstances"] == 1


def test_deletes_shrink_and_then_delete_the_study(cast_archive: Server, fhir: FhirServer):
    study, series_a, series_b, patient_id = new_uid(), new_uid(), new_uid(), f"PID-{new_uid()[-10:]}"
    datasets = [
        make_dataset(study, series_a, PatientID=patient_id),
        make_dataset(study, series_a, PatientID=patient_id),
        make_dataset(study, series_b, PatientID=patient_id),
    ]
    store(cast_archive, datasets)
    imaging = study_with(fhir, study, 3)
    base = f"{cast_archive.url}/v2/partitions/{DEFAULT}/studies/{study}"

    assert httpx.delete(f"{base}/series/{series_a}/instances/{datasets[0].SOPInstanceUID}").status_code == 204
    shrunk = study_with(fhir, study, 2)
    series = {s["uid"]: s for s in shrunk["series"]}
    assert [i["uid"] for i in series[series_a]["instance"]] == [datasets[1].SOPInstanceUID]
    assert series[series_a]["numberOfInstances"] == 1 and shrunk["numberOfSeries"] == 2

    assert httpx.delete(f"{base}/series/{series_b}").status_code == 204
    shrunk = study_with(fhir, study, 1)
    assert [s["uid"] for s in shrunk["series"]] == [series_a] and shrunk["numberOfSeries"] == 1

    assert httpx.delete(base).status_code == 204
    wait_for(lambda: not studies(fhir, study), what="the ImagingStudy deleted")
    assert fhir.read("ImagingStudy", imaging["id"]).status_code in (404, 410)
    assert len(patients(fhir, patient_id)) == 1  # patients are never deleted


def _code(value: str, scheme: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return Sequence([item])


def _content(value_type: str, concept: Sequence, **values) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType, item.ConceptNameCodeSequence = "CONTAINS", value_type, concept
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _measured(value: str, unit: str, concept: Sequence) -> Dataset:
    measured = Dataset()
    measured.NumericValue, measured.MeasurementUnitsCodeSequence = value, _code(unit, "UCUM", unit)
    return _content("NUM", concept, MeasuredValueSequence=Sequence([measured]))


def dose_report(study: str, patient_id: str, event_uid: str) -> Dataset:
    """An X-Ray Radiation Dose SR: a DLP total, and one CT acquisition with its event UID, CTDIvol, DLP and region."""
    event = _content(
        "CONTAINER",
        _code("113819", "DCM", "CT Acquisition"),
        ContentSequence=Sequence(
            [
                _content("UIDREF", _code("113769", "DCM", "Irradiation Event UID"), UID=event_uid),
                _content(
                    "CODE",
                    _code("123014", "DCM", "Target Region"),
                    ConceptCodeSequence=_code("51185008", "SCT", "Chest"),
                ),
                _measured("12.5", "mGy", _code("113830", "DCM", "Mean CTDIvol")),
                _measured("400", "mGy.cm", _code("113838", "DCM", "DLP")),
            ]
        ),
    )
    accumulated = _content(
        "CONTAINER",
        _code("113811", "DCM", "CT Accumulated Dose Data"),
        ContentSequence=Sequence([_measured("400", "mGy.cm", _code("113813", "DCM", "CT Dose Length Product Total"))]),
    )
    return make_dataset(
        study,
        PatientID=patient_id,
        Modality="SR",
        AccessionNumber="ACC-DOSE",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.88.67",
        ValueType="CONTAINER",
        ConceptNameCodeSequence=_code("113701", "DCM", "X-Ray Radiation Dose Report"),
        ContentSequence=Sequence([accumulated, event]),
        **WITHOUT_IMAGE,
    )


def test_dose_report_observations(cast_archive: Server, fhir: FhirServer):
    study, event_uid, patient_id = new_uid(), new_uid(), f"PID-{new_uid()[-10:]}"
    report = dose_report(study, patient_id, event_uid)
    store(cast_archive, [report])
    imaging = study_with(fhir, study, 1)
    observations = wait_for(lambda: fhir.search("Observation", **{"part-of": f"ImagingStudy/{imaging['id']}"}))
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    assert set(by_code) == {"73569-6", "113852"} and len(observations) == 2

    summary = by_code["73569-6"]
    assert summary["status"] == "preliminary" and summary["code"]["coding"][0]["system"] == "http://loinc.org"
    assert {"system": DICOM_UID, "value": f"urn:oid:{study}"} in summary["identifier"]
    assert {"type": ACSN, "value": "ACC-DOSE"} in summary["identifier"]
    assert summary["partOf"] == [{"reference": f"ImagingStudy/{imaging['id']}"}]
    assert summary["subject"] == imaging["subject"]
    [dlp_total] = [c for c in summary["component"] if c["code"]["coding"][0]["code"] == "113813"]
    assert dlp_total["valueQuantity"]["value"] == 400 and dlp_total["valueQuantity"]["unit"] == "mGy.cm"

    event = by_code["113852"]
    assert event["identifier"][0] == {"system": DICOM_UID, "value": f"urn:oid:{event_uid}"}
    assert event["code"]["coding"][0]["system"] == DCM
    values = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in event["component"]}
    assert values == {"113830": 12.5, "113838": 400}
    assert event["bodySite"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "51185008",
        "display": "Chest",
    }

    assert httpx.delete(f"{cast_archive.url}/v2/partitions/{DEFAULT}/studies/{study}").status_code == 204
    wait_for(lambda: not studies(fhir, study), what="the ImagingStudy deleted")
    assert not fhir.search("Observation", identifier=f"{DICOM_UID}|urn:oid:{event_uid}")
    assert not fhir.search("Observation", identifier=f"{DICOM_UID}|urn:oid:{report.SOPInstanceUID}")


def test_poisoned_entries_are_recorded_and_later_ones_cast(cast_archive: Server, fhir: FhirServer):
    poisoned, orphan, later = make_dataset(PatientSex="X"), make_dataset(PatientID=None), make_dataset(PatientSex="M")
    store(cast_archive, [poisoned])
    store(cast_archive, [orphan], status=202)  # stored with a warning: PatientID is missing
    store(cast_archive, [later])
    study_with(fhir, later.StudyInstanceUID, 1)
    assert patients(fhir, later.PatientID)[0]["gender"] == "male"
    [patient] = patients(fhir, poisoned.PatientID)
    assert "gender" not in patient  # never a made-up value
    assert study_with(fhir, poisoned.StudyInstanceUID, 1)["subject"]["reference"] == f"Patient/{patient['id']}"
    assert not studies(fhir, orphan.StudyInstanceUID)

    status = cast_status(cast_archive, fhir.url)
    failures = {f["sopInstanceUid"]: f for f in status["failures"]}
    sex = failures[poisoned.SOPInstanceUID]
    assert sex["outcome"] == "partial" and sex["action"] == "Create"
    assert "PatientSex (0010,0040) value 'X' left out" in sex["reason"]
    assert sex["studyInstanceUid"] == poisoned.StudyInstanceUID and sex["partitionName"] == DEFAULT
    skipped = failures[orphan.SOPInstanceUID]
    assert skipped["outcome"] == "skipped" and "PatientID (0010,0020) is missing" in skipped["reason"]
    assert skipped["sequence"] > sex["sequence"]
    assert later.SOPInstanceUID not in failures
    assert status["cursor"] >= skipped["sequence"]


def test_each_partition_names_its_base_url(cast_archive: Server, fhir: FhirServer):
    partition, study = f"cast-{new_uid()[-8:]}", new_uid()
    store(cast_archive, [make_dataset(study)], partition=partition)
    imaging = study_with(fhir, study, 1)
    base = f"{cast_archive.url}/v2/partitions/{partition}"
    assert imaging["meta"]["source"] == base
    endpoint = fhir.read("Endpoint", imaging["endpoint"][0]["reference"].split("/")[1]).json()
    assert endpoint["address"] == base


# -- dicomhub cast processes ----------------------------------------------------------------------------------------
def test_remote_archive_over_dicomweb(plain_archive: Server, fhir: FhirServer, tmp_path: Path):
    study = new_uid()
    store(plain_archive, [make_dataset(study), make_dataset(study)], partition=None)
    settings = {"cast_state_file": str(tmp_path / "state.json")}
    if auth_mode():  # the archive wants tokens: the cast gets them by client credentials
        settings.update(
            cast_dicomweb_token_url=f"{shared_provider().url}/token",
            cast_dicomweb_client_id="admin",
            cast_dicomweb_client_secret="admin",
        )
    process = start_cast(plain_archive, fhir.url, "--dicomweb-url", plain_archive.url, **settings)
    try:
        imaging = study_with(fhir, study, 2)
    finally:
        stop_cast(process)
    assert imaging["meta"]["source"] == f"{plain_archive.url}/v2"
    status = cast_status(plain_archive, fhir.url, "--dicomweb-url", plain_archive.url, **settings)
    assert status["cursor"] == json.loads((tmp_path / "state.json").read_text())["cursor"] >= 2
    assert status["lagEntries"] == 0 and status["failures"] == []


def test_fhir_outage_then_catch_up(plain_archive: Server, tmp_path: Path):
    own_fhir = FhirServer(tmp_path / "fhir.log").start()
    process = start_cast(plain_archive, own_fhir.url)
    try:
        first = new_uid()
        store(plain_archive, [make_dataset(first)], partition=None)
        study_with(own_fhir, first, 1)
        own_fhir.stop()
        study, patient_id = new_uid(), f"PID-{new_uid()[-10:]}"
        datasets = [make_dataset(study, PatientID=patient_id, InstanceNumber=n) for n in range(1, 7)]
        store(plain_archive, datasets, partition=None)
        time.sleep(3)  # the cast keeps failing to reach FHIR meanwhile
        assert process.poll() is None
        lagging = cast_status(plain_archive, own_fhir.url)
        assert lagging["lagEntries"] >= 6 and lagging["lagSeconds"] > 2
        own_fhir.start()  # same port, empty store
        imaging = study_with(own_fhir, study, 6, timeout=60)
        assert len(studies(own_fhir, study)) == 1 and len(patients(own_fhir, patient_id)) == 1
    finally:
        stop_cast(process)
        own_fhir.stop()
    uids = [i["uid"] for s in imaging["series"] for i in s["instance"]]
    assert sorted(uids) == sorted(ds.SOPInstanceUID for ds in datasets)


def test_kill_9_resumes_at_the_cursor(plain_archive: Server, fhir: FhirServer):
    study, patient_id = new_uid(), f"PID-{new_uid()[-10:]}"
    series = [new_uid() for _ in range(4)]
    datasets = [make_dataset(study, series[n % 4], PatientID=patient_id, InstanceNumber=n) for n in range(120)]
    store(plain_archive, datasets, partition=None)
    # the cast writes 50 instances at a time: its updates answered slowly, so the kill finds it mid-feed
    fhir.inject_faults(*[{"method": "PUT", "delayMs": 2000}] * 3)
    process = start_cast(plain_archive, fhir.url)
    try:
        wait_for(lambda: (s := studies(fhir, study)) and s[0]["numberOfInstances"] >= 10, 60, "ten instances cast")
        process.kill()  # SIGKILL, mid-feed
        process.wait(timeout=30)
        cut = studies(fhir, study)[0]["numberOfInstances"]
        assert cut < 120, "the cast finished before it was killed"
        status = cast_status(plain_archive, fhir.url)
        assert status["lagEntries"] > 0
        process = start_cast(plain_archive, fhir.url)
        imaging = study_with(fhir, study, 120, timeout=90)
    finally:
        stop_cast(process)
    uids = [i["uid"] for s in imaging["series"] for i in s["instance"]]
    assert len(uids) == len(set(uids)) == 120 and imaging["numberOfSeries"] == 4
    assert len(studies(fhir, study)) == 1 and len(patients(fhir, patient_id)) == 1
    assert cast_status(plain_archive, fhir.url)["lagEntries"] == 0


def test_status_needs_a_fhir_url(plain_archive: Server):
    env = {k: v for k, v in plain_archive.env().items() if not k.startswith("DICOMHUB_CAST_")}
    done = subprocess.run(
        [sys.executable, "-m", "dicomhub", "cast", "--status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "DICOMHUB_CAST_FHIR_URL is not set" in done.stderr
    assert os.environ.get("DICOMHUB_CAST_FHIR_URL") is None


def _gap(requests: list[dict], index: int) -> float:
    """Seconds between ``requests[index]`` and the request after it (the cast is one thread: its retry)."""
    return (requests[index + 1]["at"] - requests[index]["at"]) / 1000


def test_transient_fhir_errors_are_retried(plain_archive: Server, tmp_path: Path):
    own_fhir = FhirServer(tmp_path / "fhir.log").start()
    process = start_cast(plain_archive, own_fhir.url, cast_fhir_timeout_seconds="1.5")
    try:
        warm = new_uid()
        store(plain_archive, [make_dataset(warm)], partition=None)
        study_with(own_fhir, warm, 1)  # the Endpoint exists: the faults below hit the Patient and ImagingStudy
        own_fhir.inject_faults(
            {"status": 429, "retryAfter": 1},
            {"status": 429, "retryAfter": 3600},  # capped: never an hour's wait
            {"status": 503},
            {"status": 502},
            {"method": "POST", "delayMs": 3000},  # created, but answered after the cast stopped waiting
            {"method": "PUT", "delayMs": 3000},  # updated, likewise: the retry's If-Match is stale by then
        )
        start = len(own_fhir.requests())
        study, patient_id = new_uid(), f"PID-{new_uid()[-10:]}"
        datasets = [make_dataset(study, PatientID=patient_id, InstanceNumber=n) for n in range(1, 5)]
        store(plain_archive, datasets[:2], partition=None)
        study_with(own_fhir, study, 2, timeout=60)
        store(plain_archive, datasets[2:], partition=None)  # a study the cast knows: updated with If-Match
        imaging = study_with(own_fhir, study, 4, timeout=60)
        assert len(studies(own_fhir, study)) == 1 and len(patients(own_fhir, patient_id)) == 1
        # written, but the cast is done only once its cursor moved: after the retry of a late answer
        status = wait_for(lambda: (s := cast_status(plain_archive, own_fhir.url))["lagEntries"] == 0 and s)
        requests = own_fhir.requests()[start:]
    finally:
        stop_cast(process)
        own_fhir.stop()

    uids = [i["uid"] for s in imaging["series"] for i in s["instance"]]
    assert sorted(uids) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert status["lagEntries"] == 0 and status["failures"] == []

    statuses = [r["status"] for r in requests]
    assert statuses[:4] == [429, 429, 503, 502], requests[:6]
    assert all(requests[n]["url"] == requests[0]["url"] for n in range(5)), "the same request retried"
    assert 0.95 <= _gap(requests, 0) < 2.5  # Retry-After: 1 honoured
    assert 5 <= _gap(requests, 1) <= MAX_BACKOFF_SECONDS + 1.5  # Retry-After: 3600 capped
    assert 0.1 <= _gap(requests, 2) < 3 and 0.1 <= _gap(requests, 3) < 3  # 5xx: exponential back-off from 0.25 s

    # a request answered too late: the cast waited its timeout, sent it again, and that changed nothing twice
    for method in ("POST", "PUT"):
        late = next(n for n, r in enumerate(requests) if r["method"] == method and r["status"] in (200, 201))
        retry = requests[late + 1]
        assert retry["method"] == method and retry["url"] == requests[late]["url"]
        assert 1.4 <= _gap(requests, late) < 3
        assert retry["status"] == (200 if method == "POST" else 412)  # the If-None-Exist match / the stale If-Match


def test_oauth2_client_credentials_towards_fhir(plain_archive: Server, tmp_path: Path):
    provider = shared_provider()
    own_fhir = FhirServer(
        tmp_path / "fhir.log", oidc=(provider.url, provider.audience), token=lambda: provider.cached_token("admin")
    ).start()
    try:
        refused = httpx.get(f"{own_fhir.url}/Patient", timeout=10)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["issue"][0]["diagnostics"] == "a bearer token is required"
        # the "shortlived" client's tokens live one second: the cast must fetch new ones as it goes
        process = start_cast(
            plain_archive,
            own_fhir.url,
            cast_fhir_token_url=f"{provider.url}/token",
            cast_fhir_client_id="shortlived",
            cast_fhir_client_secret="shortlived",
        )
        try:
            first, second = new_uid(), new_uid()
            store(plain_archive, [make_dataset(first)], partition=None)
            study_with(own_fhir, first, 1)
            time.sleep(2)  # the token it used has expired
            store(plain_archive, [make_dataset(second)], partition=None)
            study_with(own_fhir, second, 1)
            requests = own_fhir.requests()
        finally:
            stop_cast(process)
    finally:
        own_fhir.stop()

    cast = [r for r in requests if r["url"] != "metadata" and r["url"] != "Patient"]
    assert cast and all(r["status"] in (200, 201, 401) for r in cast), cast
    assert len({r["jti"] for r in cast if r["status"] != 401}) >= 2  # a new token after the first expired
    for n, request in enumerate(cast):
        if request["status"] == 401:  # expired on the way: a new token, and the same request again
            retry = cast[n + 1]
            assert retry["url"] == request["url"] and retry["status"] in (200, 201)
