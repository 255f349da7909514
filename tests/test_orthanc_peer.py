"""Interoperability with a real peer: an Orthanc (Debian orthanc + orthanc-dicomweb) that uses dicomhub as its
remote DICOMweb server. Orthanc STOWs with chunked bodies, searches and reads metadata with ``Accept: */*``, and
retrieves with ``transfer-syntax=*``."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pydicom
import pytest

from tests.factory import make_dataset, make_rgb_sample, to_bytes
from tests.servers import Server
from tests.support.oidc.provider import admin_header_for
from tests.support.orthanc import DICOMWEB_PLUGIN, ORTHANC, running_orthanc


def _token_headers(url: str) -> dict[str, dict[str, str]]:
    """Orthanc's peer settings that send the admin token when the suite runs with authentication on."""
    header = admin_header_for(url)
    return {"HttpHeaders": {"Authorization": header}} if header else {}


@pytest.fixture(scope="module")
def orthanc(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc with its DICOMweb plugin is required (scripts/test.sh installs orthanc, orthanc-dicomweb)")
    with running_orthanc(
        tmp_path_factory.mktemp("orthanc"),
        "peer",
        Plugins=[str(DICOMWEB_PLUGIN)],
        DicomServerEnabled=False,
        HttpCompressionEnabled=False,
        DicomWeb={
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {"dicomhub": {"Url": f"{server.url}/v2/", **_token_headers(server.url)}},
        },
    ) as client:
        yield client


def _upload(orthanc: httpx.Client, data: bytes) -> str:
    response = orthanc.post("/instances", content=data)
    assert response.status_code == 200, response.text
    return response.json()["ID"]


def test_orthanc_stows_searches_reads_metadata_and_retrieves(orthanc: httpx.Client, http: httpx.Client):
    ds = make_dataset(PatientName="Peer^Orthanc", AccessionNumber="PEER-1", rows=64, columns=64)
    sample = make_rgb_sample("blue-circle")  # 2.9 MB: Orthanc sends it chunked
    ids = [_upload(orthanc, to_bytes(ds)), _upload(orthanc, to_bytes(sample))]

    stow = orthanc.post("/dicom-web/servers/dicomhub/stow", json={"Resources": ids, "Synchronous": True})
    assert stow.status_code == 200, stow.text

    # dicomhub has both, byte-identical to what Orthanc held
    for orthanc_id, study, series, sop in (
        (ids[0], ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
        (ids[1], sample.StudyInstanceUID, sample.SeriesInstanceUID, sample.SOPInstanceUID),
    ):
        ours = http.get(
            f"/v2/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": "application/dicom; transfer-syntax=*"},
        )
        assert ours.status_code == 200
        assert ours.content[132:] == orthanc.get(f"/instances/{orthanc_id}/file").content[132:]

    # Orthanc's QIDO through dicomhub (Accept: */* on its side)
    found = orthanc.post(
        "/dicom-web/servers/dicomhub/qido",
        json={"Uri": "/studies", "Arguments": {"AccessionNumber": "PEER-1"}},
    )
    assert found.status_code == 200, found.text
    # Orthanc answers in its own simplified JSON: {"0020000D": {"Value": "<uid>", ...}}
    assert [s["0020000D"]["Value"] for s in found.json()] == [ds.StudyInstanceUID]
    assert found.json()[0]["00100010"]["Value"] == "Peer^Orthanc"

    # metadata through Orthanc's generic GET
    metadata = orthanc.post("/dicom-web/servers/dicomhub/get", json={"Uri": f"/studies/{ds.StudyInstanceUID}/metadata"})
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()[0]["00080050"]["Value"] == ["PEER-1"]

    # delete from Orthanc, then WADO-RS retrieve it back from dicomhub
    assert orthanc.delete(f"/instances/{ids[0]}").status_code == 200
    retrieve = orthanc.post(
        "/dicom-web/servers/dicomhub/retrieve",
        json={"Resources": [{"Study": ds.StudyInstanceUID}], "Synchronous": True},
    )
    assert retrieve.status_code == 200, retrieve.text
    back = orthanc.post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": ds.SOPInstanceUID}})
    assert len(back.json()) == 1
    restored = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{back.json()[0]}/file").content))
    assert restored.PixelData == ds.PixelData
    assert restored.PatientName == "Peer^Orthanc"
