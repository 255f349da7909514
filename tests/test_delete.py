"""Delete of instances, series and studies: what disappears (WADO, metadata, QIDO, files on disk), what stays, and
that the background file cleanup survives a crash."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.factory import new_uid
from tests.servers import Server
from tests.test_wado import Stored, generated, parse_multipart, pydicom_file, reuid, store

ORIGINAL = {"Accept": "application/dicom; transfer-syntax=*"}
MULTIPART = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
JSON = {"Accept": "application/dicom+json"}


@dataclass
class StudyFixture:
    study: str
    series_a: str
    series_b: str
    a1: Stored
    a2: Stored
    b1: Stored

    @property
    def instances(self) -> list[Stored]:
        return [self.a1, self.a2, self.b1]


@pytest.fixture
def study(http: httpx.Client) -> StudyFixture:
    """A fresh study per test: series A with two instances, series B with one."""
    a1 = generated(PatientName="Delete^Me")
    a2 = generated(a1.study, a1.series, PatientName="Delete^Me")
    b1 = reuid(pydicom_file("CT_small.dcm"), a1.study)
    store(http, a1, a2, b1)
    return StudyFixture(a1.study, a1.series, b1.series, a1, a2, b1)


def blob_files(server: Server, inst: Stored) -> list[Path]:
    return server.blob_files(f"*/{inst.study}/{inst.series}/{inst.sop}.*")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def assert_files_removed(server: Server, *instances: Stored) -> None:
    assert wait_until(lambda: not any(blob_files(server, i) for i in instances)), [
        blob_files(server, i) for i in instances
    ]


def assert_retrievable(http: httpx.Client, inst: Stored) -> None:
    response = http.get(inst.path(), headers=ORIGINAL)
    assert response.status_code == 200, response.text
    assert response.content == inst.data


def qido_uids(http: httpx.Client, path: str, tag: str) -> list[str]:
    response = http.get(path, headers=JSON)
    if response.status_code == 204:
        return []
    assert response.status_code == 200, response.text
    return [item[tag]["Value"][0] for item in response.json()]


def instance_path(inst: Stored) -> str:
    return f"/v2/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}"


# -- instance --------------------------------------------------------------------------------------------------------
def test_delete_instance(server, http, study):
    victim = study.a1
    assert len(blob_files(server, victim)) == 1
    response = http.delete(instance_path(victim))
    assert response.status_code == 204
    assert response.content == b""

    assert http.get(victim.path(), headers=ORIGINAL).status_code == 404
    assert http.get(f"{victim.path()}/metadata", headers=JSON).status_code == 404
    assert http.get(f"{victim.path()}/frames/1", headers={"Accept": "*/*"}).status_code == 404
    series_instances = qido_uids(http, f"/v2/studies/{study.study}/series/{study.series_a}/instances", "00080018")
    assert series_instances == [study.a2.sop]
    assert qido_uids(http, f"/v2/instances?SOPInstanceUID={victim.sop}", "00080018") == []

    # siblings stay, bytes unchanged; the study is still searchable with one instance less
    for sibling in (study.a2, study.b1):
        assert_retrievable(http, sibling)
    [found] = http.get(
        f"/v2/studies?StudyInstanceUID={study.study}&includefield=NumberOfStudyRelatedInstances", headers=JSON
    ).json()
    assert found["00201208"]["Value"] == [2]  # NumberOfStudyRelatedInstances
    parts = parse_multipart(
        http.get(
            f"/v2/studies/{study.study}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
    )
    assert sorted(p.data for p in parts) == sorted([study.a2.data, study.b1.data])

    second = http.delete(instance_path(victim))
    assert second.status_code == 404
    assert "cannot be found" in second.text

    assert_files_removed(server, victim)
    assert len(blob_files(server, study.a2)) == 1
    assert len(blob_files(server, study.b1)) == 1


def test_deleting_last_instance_removes_the_series(server, http, study):
    assert http.delete(instance_path(study.b1)).status_code == 204
    assert qido_uids(http, f"/v2/studies/{study.study}/series", "0020000E") == [study.series_a]
    assert qido_uids(http, f"/v2/series?SeriesInstanceUID={study.series_b}", "0020000E") == []
    assert http.get(f"/v2/studies/{study.study}/series/{study.series_b}", headers=MULTIPART).status_code == 404
    response = http.get(f"/v2/studies/{study.study}/series/{study.series_b}/metadata", headers=JSON)
    assert response.status_code == 404
    assert qido_uids(http, f"/v2/studies?StudyInstanceUID={study.study}", "0020000D") == [study.study]
    assert_files_removed(server, study.b1)

    # and the last instances of the last series remove the study
    assert http.delete(instance_path(study.a1)).status_code == 204
    assert http.delete(instance_path(study.a2)).status_code == 204
    assert qido_uids(http, f"/v2/studies?StudyInstanceUID={study.study}", "0020000D") == []
    assert http.get(f"/v2/studies/{study.study}", headers=MULTIPART).status_code == 404
    assert http.delete(f"/v2/studies/{study.study}").status_code == 404


# -- series ----------------------------------------------------------------------------------------------------------
def test_delete_series(server, http, study):
    response = http.delete(f"/v2/studies/{study.study}/series/{study.series_a}")
    assert response.status_code == 204
    assert response.content == b""

    series_path = f"/v2/studies/{study.study}/series/{study.series_a}"
    assert http.get(series_path, headers=MULTIPART).status_code == 404
    assert http.get(f"{series_path}/metadata", headers=JSON).status_code == 404
    for gone in (study.a1, study.a2):
        assert http.get(gone.path(), headers=ORIGINAL).status_code == 404
    assert qido_uids(http, f"/v2/studies/{study.study}/series", "0020000E") == [study.series_b]
    assert qido_uids(http, f"{series_path}/instances", "00080018") == []
    assert_retrievable(http, study.b1)

    assert http.delete(series_path).status_code == 404
    assert_files_removed(server, study.a1, study.a2)
    assert len(blob_files(server, study.b1)) == 1


# -- study -----------------------------------------------------------------------------------------------------------
def test_delete_study(server, http, study):
    other = generated(PatientName="Delete^Me")  # same patient, another study: must survive
    store(http, other)
    response = http.delete(f"/v2/studies/{study.study}")
    assert response.status_code == 204
    assert response.content == b""

    assert http.get(f"/v2/studies/{study.study}", headers=MULTIPART).status_code == 404
    assert http.get(f"/v2/studies/{study.study}/metadata", headers=JSON).status_code == 404
    for gone in study.instances:
        assert http.get(gone.path(), headers=ORIGINAL).status_code == 404
    assert qido_uids(http, f"/v2/studies?StudyInstanceUID={study.study}", "0020000D") == []
    assert qido_uids(http, f"/v2/studies/{study.study}/instances", "00080018") == []
    assert http.get(f"/v2/studies/{study.study}/series", headers=JSON).status_code == 204

    assert_retrievable(http, other)
    found = qido_uids(http, f"/v2/studies?PatientID={other.ds.PatientID}", "0020000D")
    assert found == [other.study]

    second = http.delete(f"/v2/studies/{study.study}")
    assert second.status_code == 404
    assert "cannot be found" in second.text
    assert_files_removed(server, *study.instances)
    assert len(blob_files(server, other)) == 1
    # the study's folders are pruned once empty
    assert wait_until(lambda: not list((server.data_dir / "blobs").glob(f"*/{study.study}")))


def test_delete_with_v1_route(server, http):
    inst = generated()
    store(http, inst)
    assert http.delete(f"/v1/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}").status_code == 204
    assert http.get(inst.path("v1"), headers=ORIGINAL).status_code == 404
    assert_files_removed(server, inst)


def test_search_after_deleting_the_newest_instance_matches_the_remaining_one(http):
    first = generated(PatientName="Alpha^Anna", PatientID="P-A-" + new_uid()[-8:])
    newest = generated(first.study, first.series, PatientName="Beta^Bert", PatientID="P-B-" + new_uid()[-8:])
    store(http, first)
    store(http, newest)
    assert http.delete(instance_path(newest)).status_code == 204
    query = f"/v2/studies?StudyInstanceUID={first.study}"
    assert qido_uids(http, f"{query}&PatientID={newest.ds.PatientID}", "0020000D") == []
    assert qido_uids(http, f"{query}&PatientID={first.ds.PatientID}", "0020000D") == [first.study]


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["notAStudyInstanceUid", "1.2.abc", "1." + "2" * 64, "1.2.3."])
def test_invalid_uids(http, study, bad):
    for path in (
        f"/v2/studies/{bad}",
        f"/v2/studies/{study.study}/series/{bad}",
        f"/v2/studies/{study.study}/series/{study.series_a}/instances/{bad}",
        f"/v2/studies/{bad}/series/{study.series_a}/instances/{study.a1.sop}",
    ):
        response = http.delete(path)
        assert response.status_code == 400, path
        assert "invalid" in response.text.lower()
    for inst in study.instances:
        assert_retrievable(http, inst)


def test_unknown_targets(http, study):
    unknown = "1.2.3.4.5.6.7.8.9"
    for path in (
        f"/v2/studies/{unknown}",
        f"/v2/studies/{study.study}/series/{unknown}",
        f"/v2/studies/{study.study}/series/{study.series_a}/instances/{unknown}",
        f"/v2/studies/{study.study}/series/{study.series_b}/instances/{study.a1.sop}",  # wrong series
        f"/v2/studies/{unknown}/series/{study.series_a}",
    ):
        response = http.delete(path)
        assert response.status_code == 404, path
        assert "cannot be found" in response.text
    for inst in study.instances:
        assert_retrievable(http, inst)


# -- re-store --------------------------------------------------------------------------------------------------------
def test_store_again_after_delete(server, http, study):
    victim = study.a1
    [old_file] = blob_files(server, victim)
    assert http.delete(f"/v2/studies/{study.study}").status_code == 204
    response = http.post(
        "/v2/studies",
        content=victim.data,
        headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"},
    )
    assert response.status_code == 200, response.text
    assert "00081198" not in response.json()
    assert_retrievable(http, victim)
    assert qido_uids(http, f"/v2/studies/{study.study}/instances", "00080018") == [victim.sop]
    # the old file goes, the new one (a new name) stays
    assert wait_until(lambda: not old_file.exists())
    [new_file] = blob_files(server, victim)
    assert new_file != old_file
    assert new_file.read_bytes() == victim.data
    # the other instances of the deleted study are not back
    assert http.get(study.a2.path(), headers=ORIGINAL).status_code == 404


# -- durable cleanup -------------------------------------------------------------------------------------------------
def test_file_cleanup_survives_a_crash(tmp_path_factory):
    """The file of a deleted instance is queued in the index, not removed inline: a server killed before its cleanup
    runs leaves the file, and the next process removes it."""
    data_dir = tmp_path_factory.mktemp("dicomhub-cleanup")
    lazy = Server(data_dir, cleanup_interval_seconds="3600").start()  # one pass at start-up, then none for an hour
    try:
        with httpx.Client(base_url=lazy.url, timeout=60) as http:
            victim, keeper = generated(), generated()
            store(http, victim, keeper)
            assert http.delete(instance_path(victim)).status_code == 204
            assert http.get(victim.path(), headers=ORIGINAL).status_code == 404
        time.sleep(0.5)
        assert len(blob_files(lazy, victim)) == 1  # deleted from the index, file still there
    finally:
        lazy.kill()  # SIGKILL: no shutdown hook runs

    restarted = Server(data_dir).start()
    try:
        assert_files_removed(restarted, victim)
        assert len(blob_files(restarted, keeper)) == 1
        with httpx.Client(base_url=restarted.url, timeout=60) as http:
            assert_retrievable(http, keeper)
            assert http.get(victim.path(), headers=ORIGINAL).status_code == 404
    finally:
        restarted.stop()
