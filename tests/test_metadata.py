"""WADO-RS metadata: DICOM JSON per instance (bulk VRs left out), ETag / If-None-Match, Accept rules, errors."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.factory import make_dataset, new_uid
from tests.servers import Server
from tests.test_wado import (
    BULK_VRS,
    IMPLICIT,
    Stored,
    generated,
    get_without_accept,
    pydicom_file,
    reuid,
    store,
)

JSON = {"Accept": "application/dicom+json"}
PRIVATE_CREATOR = "DICOMHUB TEST"


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def rich_instance(study: str, series: str, transfer_syntax: str | None = None) -> Stored:
    """A generated instance with the value representations the JSON model has rules for."""
    kwargs = {"transfer_syntax": transfer_syntax} if transfer_syntax else {}
    ds = make_dataset(
        study,
        series,
        PatientName="Meta^Jane^^Dr",
        InstanceNumber="7",
        SliceThickness="2.5",
        ImagePositionPatient=["1.5", "-2", "3e2"],
        SeriesDescription="metadata",
        **kwargs,
    )
    procedure = code("P1", "DCM", "Procedure")
    procedure.ModifierCodeSequence = Sequence([code("M1", "DCM", "Modifier")])
    ds.ProcedureCodeSequence = Sequence([procedure])
    ds.EncapsulatedDocument = b"%PDF-1.4 not really"  # OB
    ds.RedPaletteColorLookupTableData = b"\x00\x01" * 4  # OW
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "private value")
    block.add_new(0x02, "UN", b"unknown!")
    data = io.BytesIO()
    ds.preamble = bytes(128)
    ds.save_as(data, enforce_file_format=True)
    raw = data.getvalue()
    return Stored(study, series, str(ds.SOPInstanceUID), raw, pydicom.dcmread(io.BytesIO(raw)))


@dataclass
class MetadataFixture:
    study: str
    series_a: str
    series_b: str
    explicit: Stored
    implicit: Stored
    sr: Stored

    @property
    def instances(self) -> list[Stored]:
        return [self.explicit, self.implicit, self.sr]


@pytest.fixture(scope="module")
def data(server: Server) -> MetadataFixture:
    study, series_a, series_b = new_uid(), new_uid(), new_uid()
    fixture = MetadataFixture(
        study,
        series_a,
        series_b,
        rich_instance(study, series_a),
        rich_instance(study, series_a, IMPLICIT),
        reuid(pydicom_file("test-SR.dcm"), study, series_b),
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        store(client, *fixture.instances)
    return fixture


def metadata_path(study: str, series: str | None = None, sop: str | None = None, version: str = "v2") -> str:
    path = f"/{version}/studies/{study}"
    if series:
        path += f"/series/{series}"
    if sop:
        path += f"/instances/{sop}"
    return path + "/metadata"


def by_sop(body: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["00080018"]["Value"][0]: item for item in body}


def walk(model: dict[str, Any]):
    """Every (tag, element) of a DICOM JSON dataset, nested items included."""
    for tag, element in model.items():
        yield tag, element
        if element.get("vr") == "SQ":
            for item in element.get("Value", []):
                yield from walk(item)


def sequence_depth(model: dict[str, Any], tag: str) -> int:
    items = model.get(tag, {}).get("Value", [])
    return 1 + max((sequence_depth(item, tag) for item in items), default=0) if items else 0


def strip_bulk(model: dict[str, Any]) -> dict[str, Any]:
    """pydicom's own JSON of a dataset the way PS3.18 F.2 / Azure's metadata has it: no bulk VRs, no group lengths,
    no empty Value arrays (an empty sequence is ``{"vr": "SQ"}``)."""
    out = {}
    for tag, element in model.items():
        if element.get("vr") in BULK_VRS or tag.endswith("0000"):
            continue
        if element.get("Value") == []:
            element = {k: v for k, v in element.items() if k != "Value"}
        if element.get("vr") == "SQ" and "Value" in element:
            element = {**element, "Value": [strip_bulk(item) for item in element["Value"]]}
        out[tag] = element
    return out


# -- content ---------------------------------------------------------------------------------------------------------
def test_study_metadata_one_dataset_per_instance(http, data):
    response = http.get(metadata_path(data.study), headers=JSON)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert isinstance(body, list)
    assert set(by_sop(body)) == {i.sop for i in data.instances}
    for item in body:
        assert item["0020000D"] == {"vr": "UI", "Value": [data.study]}
        assert "7FE00010" not in item
        bulk = [(tag, element["vr"]) for tag, element in walk(item) if element.get("vr") in BULK_VRS]
        assert not bulk


def test_series_and_instance_metadata_scope(http, data):
    series = http.get(metadata_path(data.study, data.series_a), headers=JSON)
    assert series.status_code == 200
    assert set(by_sop(series.json())) == {data.explicit.sop, data.implicit.sop}
    series_b = http.get(metadata_path(data.study, data.series_b), headers=JSON).json()
    assert set(by_sop(series_b)) == {data.sr.sop}
    for inst in data.instances:
        response = http.get(metadata_path(inst.study, inst.series, inst.sop), headers=JSON)
        assert response.status_code == 200
        body = response.json()
        assert isinstance(body, list) and len(body) == 1
        assert body[0]["00080018"]["Value"] == [inst.sop]
        assert body[0]["0020000E"]["Value"] == [inst.series]


def test_value_representations_in_json(http, data):
    for inst in (data.explicit, data.implicit):
        [item] = http.get(metadata_path(inst.study, inst.series, inst.sop), headers=JSON).json()
        assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Meta^Jane^^Dr"}]}
        assert item["00200013"] == {"vr": "IS", "Value": [7]}
        assert item["00180050"] == {"vr": "DS", "Value": [2.5]}
        assert item["00200032"]["vr"] == "DS"
        assert item["00200032"]["Value"] == [1.5, -2, 300]
        assert item["00280010"] == {"vr": "US", "Value": [16]}
        assert item["0008103E"] == {"vr": "LO", "Value": ["metadata"]}
        procedure = item["00081032"]
        assert procedure["vr"] == "SQ"
        [proc_item] = procedure["Value"]
        assert proc_item["00080100"] == {"vr": "SH", "Value": ["P1"]}
        [modifier] = proc_item["0040A195"]["Value"]  # ModifierCodeSequence
        assert modifier["00080104"] == {"vr": "LO", "Value": ["Modifier"]}
        for absent in ("7FE00010", "00420011", "00281201", "00091002"):  # OW pixels, OB, OW, UN
            assert absent not in item, absent


def test_private_tags_explicit_kept_implicit_dropped(http, data):
    [explicit] = http.get(metadata_path(data.study, data.series_a, data.explicit.sop), headers=JSON).json()
    assert explicit["00091001"] == {"vr": "LO", "Value": ["private value"]}
    # implicit VR: the private element has no known VR, so it is UN and left out of the metadata ...
    [implicit] = http.get(metadata_path(data.study, data.series_a, data.implicit.sop), headers=JSON).json()
    assert "00091001" not in implicit
    assert implicit["00090010"]["Value"] == [PRIVATE_CREATOR]
    # ... but it stays in the file
    response = http.get(data.implicit.path(), headers={"Accept": "application/dicom; transfer-syntax=*"})
    stored = pydicom.dcmread(io.BytesIO(response.content))
    assert stored[0x00091001].value == b"private value "  # padded to even length


def test_structured_report_nested_content(http, data):
    [item] = http.get(metadata_path(data.study, data.series_b, data.sr.sop), headers=JSON).json()
    expected = strip_bulk(data.sr.ds.to_json_dict())
    assert sequence_depth(item, "0040A730") == sequence_depth(expected, "0040A730") >= 4
    assert item == expected
    assert item["0040A730"]["vr"] == "SQ"
    concept = item["0040A043"]["Value"][0]
    assert concept["00080104"]["Value"] == [data.sr.ds.ConceptNameCodeSequence[0].CodeMeaning]


def test_metadata_with_dicomweb_client(server, http, data):
    client = DICOMwebClient(url=f"{server.url}/v2")
    study = client.retrieve_study_metadata(data.study)
    assert by_sop(study) == by_sop(http.get(metadata_path(data.study), headers=JSON).json())
    series = client.retrieve_series_metadata(data.study, data.series_a)
    assert set(by_sop(series)) == {data.explicit.sop, data.implicit.sop}
    instance = client.retrieve_instance_metadata(data.study, data.series_b, data.sr.sop)
    assert instance["00080018"]["Value"] == [data.sr.sop]
    assert pydicom.Dataset.from_json(instance).ContentSequence


def test_v1_metadata(http, data):
    response = http.get(metadata_path(data.study, version="v1"), headers=JSON)
    assert response.status_code == 200
    assert len(response.json()) == 3


def test_gzip_when_asked(http, data):
    response = http.get(metadata_path(data.study), headers={**JSON, "Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == "gzip"
    assert set(by_sop(response.json())) == {i.sop for i in data.instances}


# -- ETag ------------------------------------------------------------------------------------------------------------
def etag_of(http: httpx.Client, path: str) -> str:
    response = http.get(path, headers=JSON)
    assert response.status_code == 200, response.text
    return response.headers["etag"]


def test_etag_formats(http, data):
    instance_tags = {i.sop: etag_of(http, metadata_path(i.study, i.series, i.sop)) for i in data.instances}
    for tag in instance_tags.values():
        assert tag.isdigit(), tag
    watermarks = {sop: int(tag) for sop, tag in instance_tags.items()}
    assert len(set(watermarks.values())) == 3
    assert etag_of(http, metadata_path(data.study)) == f"{max(watermarks.values())}-3"
    series_a = max(watermarks[data.explicit.sop], watermarks[data.implicit.sop])
    assert etag_of(http, metadata_path(data.study, data.series_a)) == f"{series_a}-2"
    assert etag_of(http, metadata_path(data.study, data.series_b)) == f"{watermarks[data.sr.sop]}-1"


def test_if_none_match(http, data):
    for path in (
        metadata_path(data.study),
        metadata_path(data.study, data.series_a),
        metadata_path(data.study, data.series_a, data.explicit.sop),
    ):
        etag = etag_of(http, path)
        unchanged = http.get(path, headers={**JSON, "If-None-Match": etag})
        assert unchanged.status_code == 304
        assert unchanged.content == b""
        assert "etag" not in unchanged.headers
        changed = http.get(path, headers={**JSON, "If-None-Match": "0-0"})
        assert changed.status_code == 200
        assert changed.headers["etag"] == etag
        assert changed.json()
        assert http.get(path, headers={**JSON, "If-None-Match": f"{etag}0"}).status_code == 200


def test_if_none_match_tolerates_quotes_weak_tags_and_lists(http, data):
    path = metadata_path(data.study, data.series_a)
    etag = etag_of(http, path)
    for header in (f'"{etag}"', f'W/"{etag}"', f'"0-0", "{etag}"', f"0-0, {etag}"):
        assert http.get(path, headers={**JSON, "If-None-Match": header}).status_code == 304, header
    for header in ("", '"0-0", "0-1"', etag.split("-")[0]):
        assert http.get(path, headers={**JSON, "If-None-Match": header}).status_code == 200, header


def test_etag_changes_when_the_study_changes(http):
    study, series = new_uid(), new_uid()
    first = generated(study, series)
    store(http, first)
    study_path, series_path = metadata_path(study), metadata_path(study, series)
    before = etag_of(http, study_path)
    assert before.endswith("-1")
    series_before = etag_of(http, series_path)

    other_series = generated(study)
    store(http, other_series)
    after_add = etag_of(http, study_path)
    assert after_add != before
    assert after_add.endswith("-2")
    assert int(after_add.split("-")[0]) > int(before.split("-")[0])
    assert etag_of(http, series_path) == series_before  # that series did not change
    assert http.get(study_path, headers={**JSON, "If-None-Match": before}).status_code == 200

    sibling = generated(study, series)
    store(http, sibling)
    after_sibling = etag_of(http, study_path)
    assert after_sibling.endswith("-3")
    assert etag_of(http, series_path) != series_before
    assert http.get(study_path, headers={**JSON, "If-None-Match": after_sibling}).status_code == 304

    assert http.delete(f"/v2/studies/{study}/series/{series}/instances/{sibling.sop}").status_code == 204
    after_delete = etag_of(http, study_path)
    assert after_delete != after_sibling
    assert after_delete == after_add  # the same instances as before the sibling came
    assert http.get(study_path, headers={**JSON, "If-None-Match": after_sibling}).status_code == 200
    assert etag_of(http, series_path) == series_before

    # deleting the oldest instance changes the count though not the newest watermark
    assert http.delete(f"/v2/studies/{study}/series/{series}/instances/{first.sop}").status_code == 204
    only_other = etag_of(http, study_path)
    assert only_other == f"{after_add.split('-')[0]}-1"
    assert http.get(study_path, headers={**JSON, "If-None-Match": after_add}).status_code == 200


# -- Accept, not found, invalid -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "accept",
    [
        "application/dicom+json",
        "APPLICATION/DICOM+JSON",
        "application/dicom+json; charset=utf-8",
        "application/json",
        "*/*",
        "application/*",
        "text/html, application/dicom+json; q=0.5",
    ],
)
def test_accepted_media_types(http, data, accept):
    response = http.get(metadata_path(data.study, data.series_b, data.sr.sop), headers={"Accept": accept})
    assert response.status_code == 200, accept
    assert response.json()[0]["00080018"]["Value"] == [data.sr.sop]


@pytest.mark.parametrize(
    "accept",
    [
        "application/dicom",
        "application/data",
        "application/dicom+json+something",
        "text/html, image/png",
        'multipart/related; type="application/dicom+json"',
        "application/octet-stream",
    ],
)
def test_not_acceptable_media_types(http, data, accept):
    for path in (metadata_path(data.study), metadata_path(data.study, data.series_b, data.sr.sop)):
        response = http.get(path, headers={"Accept": accept})
        assert response.status_code == 406, (path, accept)
        assert response.content == b""


def test_missing_accept_is_not_acceptable(http, data):
    assert get_without_accept(http, metadata_path(data.study)).status_code == 406


def test_not_found_per_level(http, data):
    cases = [
        (metadata_path(new_uid()), "The specified study cannot be found."),
        (metadata_path(data.study, new_uid()), "The specified series cannot be found."),
        (metadata_path(data.study, data.series_a, new_uid()), "The specified instance cannot be found."),
        (metadata_path(data.study, data.series_b, data.explicit.sop), "The specified instance cannot be found."),
    ]
    for path, message in cases:
        for headers in (JSON, {**JSON, "If-None-Match": "0-0"}):
            response = http.get(path, headers=headers)
            assert response.status_code == 404, path
            assert response.text == message


@pytest.mark.parametrize("bad", ["notAStudyInstanceUid", "1.2.abc", "1." + "2" * 64])
def test_invalid_uids(http, data, bad):
    for path in (
        metadata_path(bad),
        metadata_path(data.study, bad),
        metadata_path(data.study, data.series_a, bad),
        metadata_path(bad, data.series_a, data.explicit.sop),
    ):
        response = http.get(path, headers=JSON)
        assert response.status_code == 400, path
        assert "invalid" in response.text.lower()
