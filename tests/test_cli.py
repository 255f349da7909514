"""The ``dicomhub`` command line: help texts, ``dicomhub import`` into a data folder a server then serves, and
``dicomhub sample`` (the README's tour)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.factory import make_dataset, make_instance, new_uid, to_bytes
from tests.servers import Server, database_url

ACCEPT = {"Accept": "application/dicom+json"}
ANY_SYNTAX = {"Accept": "application/dicom; transfer-syntax=*"}
SUMMARY = re.compile(r"imported: (\d+) stored \((\d+) with warnings\), (\d+) duplicates, (\d+) failed")


def run_cli(*args: str, data_dir: Path, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMHUB_")}
    env["DICOMHUB_DATA_DIR"] = str(data_dir)
    env["COLUMNS"] = "240"
    if database_url:
        env["DICOMHUB_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "dicomhub", *args], env=env, capture_output=True, text=True, timeout=180, cwd=data_dir
    )


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    match = SUMMARY.search(result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    stored, warnings, duplicates, failed = (int(g) for g in match.groups())
    return {"stored": stored, "warnings": warnings, "duplicates": duplicates, "failed": failed}


def test_help_texts(tmp_path):
    for args, needle in [
        (["--help"], "import"),
        (["serve", "--help"], "--port"),
        (["import", "--help"], "--api-version"),
        (["migrate", "--help"], "schema"),
        (["sample", "--help"], "StudyInstanceUID"),
    ]:
        result = run_cli(*args, data_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        assert needle in result.stdout
    assert not (tmp_path / "index.db").exists(), "help does not touch the data folder"


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_import_tree_and_zip_then_serve(tmp_path, engine):
    db_url = database_url(engine)
    study, series = new_uid(), new_uid()
    loose = [make_dataset(study=study, series=series, InstanceNumber=n) for n in (1, 2, 3)]
    zipped = [make_dataset(study=study, series=series, InstanceNumber=n) for n in (4, 5, 6)]
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "dup").mkdir()
    paths = [src / "a" / "one.dcm", src / "a" / "b" / "two.dcm", src / "a" / "b" / "three"]
    for path, ds in zip(paths, loose, strict=True):
        path.write_bytes(to_bytes(ds))
    shutil.copyfile(paths[0], src / "dup" / "one-again.dcm")  # a duplicate
    (src / "a" / "garbage.bin").write_bytes(os.urandom(3000))  # not DICOM at all
    no_patient = make_dataset(study=study, series=series, PatientID=None)
    (src / "a" / "no-patient-id.dcm").write_bytes(to_bytes(no_patient))  # v2: stored with a warning
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x/four.dcm", to_bytes(zipped[0]))
        zf.writestr("x/y/five.dcm", to_bytes(zipped[1]))
        zf.writestr("six", to_bytes(zipped[2]))
        zf.writestr("notes/readme.txt", "not a DICOM file")
    broken = src / "broken.zip"  # a stored member whose bytes no longer match its CRC
    with zipfile.ZipFile(broken, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("bad.dcm", make_instance())
    raw = bytearray(broken.read_bytes())
    raw[raw.index(b"DICM") + 40] ^= 0xFF
    broken.write_bytes(bytes(raw))

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = run_cli("import", str(src), str(archive), data_dir=data_dir, database_url=db_url)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert summary(result) == {"stored": 7, "warnings": 1, "duplicates": 1, "failed": 3}, output
    assert re.search(r"failed .*garbage\.bin: 43264: The DICOM file could not be read", output), output
    assert re.search(r"failed .*batch\.zip!notes/readme\.txt: 43264: The DICOM file could not be read", output), output
    assert re.search(r"failed .*broken\.zip!bad\.dcm: the zip member could not be extracted: .*CRC", output), output
    assert "Traceback" not in output
    assert not list((data_dir / "blobs" / ".staging").glob("*")), "import leaves no spooled files behind"

    if engine == "sqlite":  # a second import of the same sources finds only duplicates (and the same failures)
        again = run_cli("import", str(src / "a"), data_dir=data_dir)
        assert again.returncode == 0, again.stderr
        assert summary(again) == {"stored": 0, "warnings": 0, "duplicates": 4, "failed": 1}

    server = Server(data_dir, db_url).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            found = client.get(f"/v2/studies/{study}/instances", headers=ACCEPT)
            assert found.status_code == 200, found.text
            expected = {ds.SOPInstanceUID for ds in loose + zipped + [no_patient]}
            assert {r["00080018"]["Value"][0] for r in found.json()} == expected
            for ds in (loose[1], zipped[1]):
                url = f"/v2/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}"
                fetched = client.get(url, headers=ANY_SYNTAX)
                assert fetched.status_code == 200
                assert fetched.content == to_bytes(ds)
            params = {"StudyInstanceUID": study, "includefield": "NumberOfStudyRelatedInstances"}
            studies = client.get("/v2/studies", params=params, headers=ACCEPT).json()
            assert studies[0]["00201208"]["Value"] == [7]
    finally:
        server.stop()


def test_sample_file_is_stored_and_served(tmp_path, http):
    """The README's tour: ``dicomhub sample`` writes a file with new UIDs each time and prints its study UID."""
    first, second = tmp_path / "sample.dcm", tmp_path / "again.dcm"
    printed = []
    for path in (first, second):
        result = run_cli("sample", str(path), data_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        printed.append(result.stdout.strip())
    ds = pydicom.dcmread(first)
    assert printed[0] == ds.StudyInstanceUID and printed[0] != printed[1]
    assert (ds.Modality, ds.Rows, ds.Columns, str(ds.PatientName)) == ("CT", 128, 128, "CompressedSamples^CT1")

    sent = first.read_bytes()
    response = http.post("/v2/studies", content=sent, headers={"Content-Type": "application/dicom", **ACCEPT})
    assert response.status_code == 200, response.text
    [stored] = response.json()["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [ds.SOPInstanceUID]
    params = {"PatientName": "compressed*", "StudyInstanceUID": printed[0]}  # the tour's search, for this study
    found = http.get("/v2/studies", params={**params, "includefield": "NumberOfStudyRelatedInstances"}, headers=ACCEPT)
    assert found.status_code == 200, found.text
    assert [study["00201208"]["Value"] for study in found.json()] == [[1]]
    metadata = http.get(f"/v2/studies/{printed[0]}/metadata", headers=ACCEPT)
    assert metadata.status_code == 200, metadata.text
    [model] = metadata.json()
    assert model["0020000D"]["Value"] == [printed[0]] and model["00100020"]["Value"] == ["1CT1"]
    fetched = http.get(
        f"/v2/studies/{printed[0]}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}", headers=ANY_SYNTAX
    )
    assert fetched.status_code == 200
    assert fetched.content[128:] == sent[128:]  # the server zeroes the preamble (CT_small.dcm's is a TIFF header)


def test_import_exit_codes_and_strict_validation(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 500)
    no_patient = tmp_path / "no-patient.dcm"
    no_patient.write_bytes(make_instance(PatientID=None))

    strict = run_cli("import", "--api-version", "1", str(garbage), str(no_patient), data_dir=data_dir)
    output = strict.stdout + strict.stderr
    assert strict.returncode == 1, "files failed and nothing was stored"
    assert summary(strict) == {"stored": 0, "warnings": 0, "duplicates": 0, "failed": 2}
    assert "garbage.dcm: 43264: The DICOM file could not be read" in output
    assert "no-patient.dcm: 43264: A required attribute is missing or invalid." in output
    assert "DICOM100: (0010,0020) - The required tag '(0010,0020)' is missing." in output

    lenient = run_cli("import", str(no_patient), data_dir=data_dir)
    assert lenient.returncode == 0
    assert summary(lenient) == {"stored": 1, "warnings": 1, "duplicates": 0, "failed": 0}

    missing = run_cli("import", str(tmp_path / "does-not-exist"), data_dir=data_dir)
    assert missing.returncode == 2
    assert "does-not-exist" in missing.stdout + missing.stderr
