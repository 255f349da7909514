"""End-to-end smoke: store a generated instance, find it, fetch it, delete it, on both engines."""

from __future__ import annotations

import io

import pydicom
from dicomweb_client.api import DICOMwebClient

from tests.factory import make_dataset


def test_store_find_fetch_delete_with_dicomweb_client(server, http):
    client = DICOMwebClient(url=f"{server.url}/v2")
    ds = make_dataset(PatientName="Smoke^Test", AccessionNumber="ACC-SMOKE")
    client.store_instances([ds])

    found = client.search_for_studies(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
    assert [r["0020000D"]["Value"][0] for r in found] == [ds.StudyInstanceUID]
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "Smoke^Test"

    fetched = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert fetched.SOPInstanceUID == ds.SOPInstanceUID
    assert fetched.PixelData == ds.PixelData

    raw = http.get(
        f"/v2/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
        headers={"Accept": "application/dicom; transfer-syntax=*"},
    )
    assert raw.status_code == 200
    stored = pydicom.dcmread(io.BytesIO(raw.content))
    assert stored.AccessionNumber == "ACC-SMOKE"
    assert stored.PixelData == ds.PixelData
    assert raw.content[128:132] == b"DICM"

    assert http.delete(f"/v2/studies/{ds.StudyInstanceUID}").status_code == 204
    assert (
        http.get(
            f"/v2/studies/{ds.StudyInstanceUID}/metadata", headers={"Accept": "application/dicom+json"}
        ).status_code
        == 404
    )
