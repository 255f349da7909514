"""End-to-end QIDO-RS: the six search resources, matching rules (Azure's and PS3.18's), attribute sets and paging.

Every test stores its own data with fresh UIDs and a fresh PatientID / AccessionNumber token, and every query is
scoped by one of them, so the shared server's other data never matches.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from tests.factory import make_dataset, multipart, new_uid, to_bytes

DICOM_JSON = {"Accept": "application/dicom+json"}


# -- helpers -----------------------------------------------------------------------------------------------------------
def token() -> str:
    return uuid.uuid4().hex[:12].upper()


def key(keyword: str) -> str:
    return f"{int(tag_for_keyword(keyword)):08X}"


def keys(*keywords: str) -> set[str]:
    return {key(k) for k in keywords}


def store(http: httpx.Client, *datasets: Dataset, version: str = "v2", expect: tuple[int, ...] = (200,)) -> None:
    content_type, body = multipart([to_bytes(ds) for ds in datasets])
    response = http.post(f"/{version}/studies", content=body, headers={"Content-Type": content_type, **DICOM_JSON})
    assert response.status_code in expect, response.text


def search(http: httpx.Client, path: str, params=None, version: str = "v2") -> list[dict]:
    """A QIDO request that must succeed: the results, or [] for 204 (whose body must be empty)."""
    response = http.get(f"/{version}{path}", params=params, headers=DICOM_JSON)
    if response.status_code == 204:
        assert response.content == b""
        return []
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == "application/dicom+json"
    body = response.json()
    assert isinstance(body, list) and body
    return body


def rejected(http: httpx.Client, path: str, params=None, version: str = "v2") -> str:
    """A QIDO request that must fail with 400; returns the plain-text message."""
    response = http.get(f"/{version}{path}", params=params, headers=DICOM_JSON)
    assert response.status_code == 400, (response.status_code, response.text)
    return response.text


def value(item: dict, keyword: str):
    element = item.get(key(keyword))
    assert element is not None, f"{keyword} missing from {sorted(item)}"
    first = element["Value"][0]
    return first["Alphabetic"] if element["vr"] == "PN" else first


def values(results: list[dict], keyword: str) -> list:
    return [value(r, keyword) for r in results]


def study(results: list[dict]) -> list[str]:
    return values(results, "StudyInstanceUID")


# -- resources and levels --------------------------------------------------------------------------------------------
RESOURCES = ("studies", "series", "instances", "study-series", "study-instances", "series-instances")
# spec 4.2: attribute -> the resources that may filter on it
ALLOWED = {
    "StudyInstanceUID": {"studies", "series", "instances"},
    "PatientName": {"studies", "series", "instances"},
    "PatientID": {"studies", "series", "instances"},
    "PatientBirthDate": {"studies", "series", "instances"},
    "AccessionNumber": {"studies", "series", "instances"},
    "ReferringPhysicianName": {"studies", "series", "instances"},
    "StudyDate": {"studies", "series", "instances"},
    "StudyDescription": {"studies", "series", "instances"},
    "ModalitiesInStudy": {"studies", "series", "instances"},
    "SeriesInstanceUID": {"series", "instances", "study-series", "study-instances"},
    "Modality": {"series", "instances", "study-series", "study-instances"},
    "PerformedProcedureStepStartDate": {"series", "instances", "study-series", "study-instances"},
    "ManufacturerModelName": {"series", "instances", "study-series", "study-instances"},
    "SOPInstanceUID": {"instances", "study-instances", "series-instances"},
}


PATH_UIDS = {
    "studies": (),
    "series": (),
    "instances": (),
    "study-series": ("StudyInstanceUID",),
    "study-instances": ("StudyInstanceUID",),
    "series-instances": ("StudyInstanceUID", "SeriesInstanceUID"),
}


def resource_path(resource: str, ds: Dataset) -> str:
    return {
        "studies": "/studies",
        "series": "/series",
        "instances": "/instances",
        "study-series": f"/studies/{ds.StudyInstanceUID}/series",
        "study-instances": f"/studies/{ds.StudyInstanceUID}/instances",
        "series-instances": f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances",
    }[resource]


def full_dataset(**overrides) -> Dataset:
    tok = token()
    attributes = dict(
        PatientID=f"PID-{tok}",
        PatientName=f"Level^Test{tok}",
        PatientBirthDate="19750203",
        AccessionNumber=f"ACC-{tok}",
        ReferringPhysicianName=f"Referrer^{tok}",
        StudyDate="20210304",
        StudyDescription=f"Study {tok}",
        Modality="CT",
        PerformedProcedureStepStartDate="20210305",
        ManufacturerModelName=f"Model-{tok}",
    )
    attributes.update(overrides)
    return make_dataset(**attributes)


def test_each_attribute_filters_at_its_levels_and_is_rejected_elsewhere(server, http):
    ds = full_dataset()
    store(http, ds)
    stored = {kw: str(ds.get(kw, "")) for kw in ALLOWED}
    stored["ModalitiesInStudy"] = "CT"
    other = {
        "StudyInstanceUID": new_uid(),
        "SeriesInstanceUID": new_uid(),
        "SOPInstanceUID": new_uid(),
        "PatientBirthDate": "19000101",
        "StudyDate": "19000101",
        "PerformedProcedureStepStartDate": "19000101",
        "ModalitiesInStudy": "XA",
        "Modality": "XA",
    }
    for resource in RESOURCES:
        path = resource_path(resource, ds)
        scope = {"StudyInstanceUID": ds.StudyInstanceUID} if resource in ("studies", "series", "instances") else {}
        for keyword, allowed_at in ALLOWED.items():
            if resource in allowed_at:
                found = search(http, path, {**scope, keyword: stored[keyword]})
                assert study(found) == [ds.StudyInstanceUID], (resource, keyword)
                if keyword != "ModalitiesInStudy":
                    assert value(found[0], keyword) == stored[keyword], (resource, keyword)
                miss = search(http, path, {**scope, keyword: other.get(keyword, "NO-SUCH-VALUE")})
                assert miss == [], (resource, keyword)
            elif PATH_UIDS[resource] and keyword in PATH_UIDS[resource]:
                rejected(http, path, {keyword: stored[keyword]})  # a path UID repeated as a query parameter
            else:
                text = rejected(http, path, {keyword: stored[keyword]})
                assert text.startswith(f"Invalid query: AttributeId {keyword} is not queryable."), (resource, text)


def test_attribute_outside_level_exact_message(server, http):
    assert rejected(http, "/studies", {"Modality": "CT"}).startswith(
        "Invalid query: AttributeId Modality is not queryable."
    )
    # hex form is reported as written
    assert rejected(http, "/studies", {"00080060": "CT"}).startswith(
        "Invalid query: AttributeId 00080060 is not queryable."
    )
    # a valid dictionary keyword that is not indexed
    assert rejected(http, "/instances", {"ImageComments": "x"}).startswith(
        "Invalid query: AttributeId ImageComments is not queryable."
    )
    # no timezone adjustment: TimezoneOffsetFromUTC is not queryable either
    assert rejected(http, "/studies", {"TimezoneOffsetFromUTC": "+0100"}).startswith(
        "Invalid query: AttributeId TimezoneOffsetFromUTC is not queryable."
    )


def test_path_uid_repeated_as_query_parameter_is_rejected(server, http):
    ds = make_dataset()
    store(http, ds)
    s, se = ds.StudyInstanceUID, ds.SeriesInstanceUID
    rejected(http, f"/studies/{s}/series", {"StudyInstanceUID": s})
    rejected(http, f"/studies/{s}/instances", {"0020000D": s})
    rejected(http, f"/studies/{s}/series/{se}/instances", {"SeriesInstanceUID": se})
    rejected(http, f"/studies/{s}/series/{se}/instances", {"StudyInstanceUID": s})
    for path, name, uid in (
        (f"/studies/{s}/series", "StudyInstanceUID", s),
        (f"/studies/{s}/instances", "0020000d", s),
        (f"/studies/{s}/series/{se}/instances", "0020000e", se),
    ):
        assert (
            rejected(http, path, {name: uid})
            == f"Invalid query: AttributeId '{name}' is already specified in the path."
        )
    # invalid path UID
    rejected(http, "/studies/not.a.uid/series")
    rejected(http, f"/studies/{s}/series/1.2.abc/instances")


def test_all_six_resources_return_the_right_rows(server, http):
    s = new_uid()
    se1, se2 = new_uid(), new_uid()
    pid = f"PID-{token()}"
    a = make_dataset(study=s, series=se1, PatientID=pid, Modality="CT")
    b = make_dataset(study=s, series=se1, PatientID=pid, Modality="CT")
    c = make_dataset(study=s, series=se2, PatientID=pid, Modality="MR")
    store(http, a, b, c)
    sops = {a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID}

    assert study(search(http, "/studies", {"PatientID": pid})) == [s]
    series = search(http, "/series", {"PatientID": pid})
    assert values(series, "SeriesInstanceUID") == [se2, se1]  # newest first
    assert values(series, "Modality") == ["MR", "CT"]
    assert set(values(series, "StudyInstanceUID")) == {s}
    instances = search(http, "/instances", {"PatientID": pid})
    assert values(instances, "SOPInstanceUID") == [c.SOPInstanceUID, b.SOPInstanceUID, a.SOPInstanceUID]
    assert values(search(http, f"/studies/{s}/series"), "SeriesInstanceUID") == [se2, se1]
    assert set(values(search(http, f"/studies/{s}/instances"), "SOPInstanceUID")) == sops
    in_series = search(http, f"/studies/{s}/series/{se1}/instances")
    assert set(values(in_series, "SOPInstanceUID")) == {a.SOPInstanceUID, b.SOPInstanceUID}
    assert set(values(in_series, "SeriesInstanceUID")) == {se1}
    # filters inside the scoped resources
    assert values(search(http, f"/studies/{s}/series", {"Modality": "MR"}), "SeriesInstanceUID") == [se2]
    assert values(search(http, f"/studies/{s}/instances", {"SeriesInstanceUID": se2}), "SOPInstanceUID") == [
        c.SOPInstanceUID
    ]
    only_b = search(http, f"/studies/{s}/series/{se1}/instances", {"SOPInstanceUID": b.SOPInstanceUID})
    assert values(only_b, "SOPInstanceUID") == [b.SOPInstanceUID]
    # scoped resources of an unknown study or series: nothing, not an error
    assert search(http, f"/studies/{new_uid()}/series") == []
    assert search(http, f"/studies/{new_uid()}/instances") == []
    assert search(http, f"/studies/{s}/series/{new_uid()}/instances") == []
    # the series of another study do not leak into a study's resources
    assert search(http, f"/studies/{s}/series", {"SeriesInstanceUID": make_dataset().SeriesInstanceUID}) == []


def test_dicomweb_client_on_all_resources(server):
    client = DICOMwebClient(url=f"{server.url}/v2")
    pid = f"PID-{token()}"
    ds = make_dataset(PatientID=pid, PatientName="Client^Test", Modality="MR")
    client.store_instances([ds])
    s, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    assert study(client.search_for_studies(search_filters={"PatientID": pid})) == [s]
    assert values(client.search_for_series(search_filters={"PatientID": pid}), "SeriesInstanceUID") == [se]
    assert values(client.search_for_instances(search_filters={"PatientID": pid}), "SOPInstanceUID") == [sop]
    assert values(client.search_for_series(study_instance_uid=s), "SeriesInstanceUID") == [se]
    assert values(client.search_for_instances(study_instance_uid=s), "SOPInstanceUID") == [sop]
    found = client.search_for_instances(study_instance_uid=s, series_instance_uid=se)
    assert values(found, "SOPInstanceUID") == [sop]
    assert client.search_for_studies(search_filters={"PatientID": pid + "X"}) == []


# -- exact matching --------------------------------------------------------------------------------------------------
def test_exact_matching_is_case_insensitive(server, http):
    tok = token()
    ds = make_dataset(
        PatientID=f"Pid-{tok}-Mixed",
        AccessionNumber=f"Acc-{tok}",
        StudyDescription=f"Head CT {tok} Routine",
        Modality="CT",
    )
    store(http, ds)
    s = ds.StudyInstanceUID
    for params in (
        {"PatientID": f"pid-{tok.lower()}-mixed"},
        {"PatientID": f"PID-{tok}-MIXED"},
        {"AccessionNumber": f"acc-{tok.lower()}"},
        {"StudyDescription": f"head ct {tok.lower()} routine", "StudyInstanceUID": s},
    ):
        found = search(http, "/studies", params)
        assert study(found) == [s], params
    # the original spelling is returned, not the folded index value
    assert value(found[0], "PatientID") == f"Pid-{tok}-Mixed"
    assert value(found[0], "StudyDescription") == f"Head CT {tok} Routine"
    assert values(search(http, f"/studies/{s}/series", {"Modality": "ct"}), "Modality") == ["CT"]
    assert values(search(http, f"/studies/{s}/series", {"Modality": "Ct"}), "Modality") == ["CT"]
    # exact means exact: no substring or prefix matching
    assert search(http, "/studies", {"PatientID": f"Pid-{tok}"}) == []
    assert search(http, "/studies", {"AccessionNumber": f"Acc-{tok}-"}) == []
    assert search(http, "/studies", {"StudyDescription": "Head CT", "StudyInstanceUID": s}) == []


def test_person_name_is_case_and_accent_insensitive(server, http):
    pid = f"PID-{token()}"
    bjorn = make_dataset(SpecificCharacterSet="ISO_IR 192", PatientID=pid, PatientName="Björn^Borg")
    plain = make_dataset(SpecificCharacterSet="ISO_IR 192", PatientID=pid, PatientName="Zoe^Ostergaard")
    store(http, bjorn, plain)
    for query in ("bjorn^borg", "BJÖRN^BORG", "Björn^Borg", "björn^borg"):
        found = search(http, "/studies", {"PatientID": pid, "PatientName": query})
        assert study(found) == [bjorn.StudyInstanceUID], query
        assert value(found[0], "PatientName") == "Björn^Borg"
    for query in ("Zoë^Østergaard", "zoe^ostergaard", "ZOÉ^OSTERGAARD"):
        found = search(http, "/studies", {"PatientID": pid, "PatientName": query})
        assert study(found) == [plain.StudyInstanceUID], query
    assert search(http, "/studies", {"PatientID": pid, "PatientName": "bjorn"}) == []
    # trailing empty components are insignificant, on either side
    padded = make_dataset(PatientID=pid, PatientName="Doe^John^^^")
    store(http, padded)
    for query in ("doe^john", "Doe^John^", "DOE^JOHN^^^^", "Doe^John^^^="):
        found = search(http, "/studies", {"PatientID": pid, "PatientName": query})
        assert study(found) == [padded.StudyInstanceUID], query
    assert study(search(http, "/studies", {"PatientID": pid, "PatientName": "Björn^Borg^^"})) == [
        bjorn.StudyInstanceUID
    ]
    # ReferringPhysicianName follows the same rule
    doc = make_dataset(SpecificCharacterSet="ISO_IR 192", PatientID=pid, ReferringPhysicianName="Müller^Jürgen")
    store(http, doc)
    found = search(http, "/studies", {"PatientID": pid, "ReferringPhysicianName": "MULLER^jurgen"})
    assert study(found) == [doc.StudyInstanceUID]


def test_trailing_nul_padding_is_equivalent(server, http):
    tok = token()
    padded = make_dataset(PatientID=f"NUL{tok}\0", AccessionNumber=f"N{tok}")
    store(http, padded, expect=(200, 202))
    plain = make_dataset(PatientID=f"PLAIN{tok}", AccessionNumber=f"P{tok}")
    store(http, plain)
    assert study(search(http, "/studies", {"PatientID": f"NUL{tok}"})) == [padded.StudyInstanceUID]
    assert study(search(http, "/studies", {"PatientID": f"NUL{tok}\0"})) == [padded.StudyInstanceUID]
    assert study(search(http, "/studies", {"PatientID": f"PLAIN{tok}\0"})) == [plain.StudyInstanceUID]
    assert study(search(http, "/studies", {"AccessionNumber": f"P{tok}\0\0"})) == [plain.StudyInstanceUID]
    assert study(search(http, "/studies", {"StudyInstanceUID": plain.StudyInstanceUID + "\0"})) == [
        plain.StudyInstanceUID
    ]


def test_only_the_first_value_of_a_multi_valued_attribute_is_indexed(server, http):
    tok = token()
    ds = make_dataset(PatientID=[f"FIRST{tok}", f"SECOND{tok}"], AccessionNumber=f"MV{tok}")
    store(http, ds, expect=(200, 202))
    found = search(http, "/studies", {"PatientID": f"FIRST{tok}"})
    assert study(found) == [ds.StudyInstanceUID]
    assert found[0][key("PatientID")]["Value"] == [f"FIRST{tok}", f"SECOND{tok}"]  # returned as stored
    assert search(http, "/studies", {"PatientID": f"SECOND{tok}"}) == []


def test_hex_keys_equal_keywords_and_keyword_case_matters(server, http):
    ds = full_dataset()
    store(http, ds)
    by_keyword = search(http, "/series", {"PatientID": ds.PatientID, "Modality": "CT"})
    by_hex = search(http, "/series", {"00100020": ds.PatientID, "00080060": "CT"})
    by_lower_hex = search(http, "/series", {"00100020": ds.PatientID, "0020000e": ds.SeriesInstanceUID})
    assert by_keyword == by_hex
    assert values(by_lower_hex, "SeriesInstanceUID") == [ds.SeriesInstanceUID]
    assert values(by_hex, "SeriesInstanceUID") == [ds.SeriesInstanceUID]
    assert study(search(http, "/studies", {"0020000d": ds.StudyInstanceUID})) == [ds.StudyInstanceUID]
    # keywords are case-sensitive: a wrongly cased keyword is an unknown parameter
    for name in ("patientid", "PATIENTID", "patientID"):
        text = rejected(http, "/studies", {name: ds.PatientID})
        assert "unknown query parameter" in text and name in text
    assert "unknown query parameter" in rejected(http, "/studies", {"NotAnAttribute": "x"})
    # private tags are not searchable, sequence paths neither
    rejected(http, "/studies", {"00091010": "x"})
    rejected(http, "/studies", {"ReferencedStudySequence.ReferencedSOPInstanceUID": "1.2"})
    # the same attribute given twice, once as keyword and once as hex
    assert "more than once" in rejected(http, "/studies", [("PatientID", "a"), ("00100020", "a")])
    assert "Duplicate" in rejected(http, "/studies", [("PatientID", "a"), ("PatientID", "b")])


# -- PS3.18 beyond Azure: wildcards, UID lists, ModalitiesInStudy ---------------------------------------------------
def test_wildcards_on_string_attributes(server, http):
    tok = token()
    pid = f"PID-{tok}"
    smith = make_dataset(
        PatientID=pid, PatientName="Smith^John", AccessionNumber=f"{tok}-001", StudyDescription="MRI Brain w/o"
    )
    smythe = make_dataset(
        PatientID=pid, PatientName="Smythe^Jane", AccessionNumber=f"{tok}-002", StudyDescription="Chest"
    )
    jones = make_dataset(
        PatientID=pid, PatientName="Jones^Bob", AccessionNumber=f"X{tok}", StudyDescription="brainstem study"
    )
    jansen = make_dataset(PatientID=pid, PatientName="Jansen^Ann", AccessionNumber=f"Y{tok}", StudyDescription="BRAIN")
    johnson = make_dataset(
        PatientID=pid, PatientName="Johnson^Al", AccessionNumber=f"Z{tok}", StudyDescription="Cerebrum"
    )
    nameless = make_dataset(PatientID=pid, PatientName=None, AccessionNumber=f"W{tok}")
    store(http, smith, smythe, jones, jansen, johnson, nameless)

    def names(params):
        return sorted(values(search(http, "/studies", {"PatientID": pid, **params}), "PatientName"))

    assert names({"PatientName": "Smi*"}) == ["Smith^John"]
    assert names({"PatientName": "sm*"}) == ["Smith^John", "Smythe^Jane"]
    assert names({"PatientName": "J?n*"}) == ["Jansen^Ann", "Jones^Bob"]
    assert names({"PatientName": "Sm?th^J*"}) == ["Smith^John"]
    assert names({"PatientName": "*^J*"}) == ["Smith^John", "Smythe^Jane"]
    assert names({"PatientName": "Smith^Joh?"}) == ["Smith^John"]
    assert names({"PatientName": "Smith^Jo?"}) == []
    assert names({"StudyDescription": "*brain*"}) == ["Jansen^Ann", "Jones^Bob", "Smith^John"]
    assert names({"StudyDescription": "brain*"}) == ["Jansen^Ann", "Jones^Bob"]
    # '*' plus other characters needs a value; a lone '*' (below) does not
    assert names({"StudyDescription": "*?"}) == ["Jansen^Ann", "Johnson^Al", "Jones^Bob", "Smith^John", "Smythe^Jane"]
    # a lone '*' is a universal match (PS3.4 C.2.2.2.4): it also matches studies without the attribute ...
    assert len(search(http, "/studies", {"PatientID": pid, "PatientName": "*"})) == 6
    assert len(search(http, "/studies", {"PatientID": pid, "StudyDescription": "*"})) == 6
    assert len(search(http, "/studies", {"PatientID": pid, "PatientName": "*", "fuzzymatching": "true"})) == 6
    assert study(search(http, "/studies", {"AccessionNumber": f"W{tok}", "StudyDescription": "**"})) == [
        nameless.StudyInstanceUID
    ]
    assert search(http, "/studies", {"AccessionNumber": f"W{tok}", "StudyDescription": "*?*"}) == []
    # AccessionNumber prefix, selective by itself
    found = search(http, "/studies", {"AccessionNumber": f"{tok}*"})
    assert sorted(study(found)) == sorted([smith.StudyInstanceUID, smythe.StudyInstanceUID])
    found = search(http, "/studies", {"AccessionNumber": f"{tok.lower()}-00?"})
    assert sorted(study(found)) == sorted([smith.StudyInstanceUID, smythe.StudyInstanceUID])
    assert sorted(values(search(http, "/studies", {"AccessionNumber": f"?{tok}"}), "AccessionNumber")) == [
        f"W{tok}",
        f"X{tok}",
        f"Y{tok}",
        f"Z{tok}",
    ]
    # at series and instance level too
    series = search(http, "/series", {"PatientID": pid, "PatientName": "Jo*", "Modality": "O?"})
    assert sorted(values(series, "StudyInstanceUID")) == sorted([jones.StudyInstanceUID, johnson.StudyInstanceUID])
    instances = search(http, "/instances", {"AccessionNumber": f"{tok}-0*"})
    assert sorted(values(instances, "SOPInstanceUID")) == sorted([smith.SOPInstanceUID, smythe.SOPInstanceUID])


def test_wildcards_through_dicomweb_client(server):
    client = DICOMwebClient(url=f"{server.url}/v2")
    tok = token()
    pid = f"PID-{tok}"
    a = make_dataset(PatientID=pid, PatientName="Smith^John", AccessionNumber=f"{tok}-1")
    b = make_dataset(PatientID=pid, PatientName="Jansen^Ann", AccessionNumber=f"{tok}-2")
    client.store_instances([a, b])
    # dicomweb_client percent-encodes '*' as %2A and '^' as %5E
    found = client.search_for_studies(search_filters={"PatientID": pid, "PatientName": "Smi*"})
    assert study(found) == [a.StudyInstanceUID]
    found = client.search_for_studies(search_filters={"PatientID": pid, "PatientName": "J?n*^A*"})
    assert study(found) == [b.StudyInstanceUID]
    found = client.search_for_series(search_filters={"AccessionNumber": f"{tok}*"})
    assert sorted(values(found, "SeriesInstanceUID")) == sorted([a.SeriesInstanceUID, b.SeriesInstanceUID])
    found = client.search_for_instances(search_filters={"AccessionNumber": f"{tok}-?"}, fields=["AccessionNumber"])
    assert sorted(values(found, "AccessionNumber")) == [f"{tok}-1", f"{tok}-2"]


def test_percent_and_underscore_are_literal(server, http):
    tok = token()
    percent = make_dataset(AccessionNumber=f"{tok}%1")
    underscore = make_dataset(AccessionNumber=f"{tok}_1")
    plain = make_dataset(AccessionNumber=f"{tok}X1")
    longer = make_dataset(AccessionNumber=f"{tok}X12")
    store(http, percent, underscore, plain, longer)
    assert study(search(http, "/studies", {"AccessionNumber": f"{tok}%1"})) == [percent.StudyInstanceUID]
    assert study(search(http, "/studies", {"AccessionNumber": f"{tok}_1"})) == [underscore.StudyInstanceUID]
    assert study(search(http, "/studies", {"AccessionNumber": f"{tok}_*"})) == [underscore.StudyInstanceUID]
    assert study(search(http, "/studies", {"AccessionNumber": f"{tok}%*"})) == [percent.StudyInstanceUID]
    assert search(http, "/studies", {"AccessionNumber": f"{tok}%"}) == []
    assert search(http, "/studies", {"AccessionNumber": f"{tok}_"}) == []
    assert sorted(study(search(http, "/studies", {"AccessionNumber": f"{tok}?1"}))) == sorted(
        [percent.StudyInstanceUID, underscore.StudyInstanceUID, plain.StudyInstanceUID]
    )
    # a backslash-free value with LIKE's escape character is literal too
    assert search(http, "/studies", {"AccessionNumber": f"{tok}\\%1"}) == []


def test_uid_list_matching_at_every_level(server, http):
    s1, s2, s3 = new_uid(), new_uid(), new_uid()
    a = make_dataset(study=s1)
    b = make_dataset(study=s2)
    c = make_dataset(study=s3)
    d = make_dataset(study=s1)
    store(http, a, b, c, d)
    assert sorted(study(search(http, "/studies", {"StudyInstanceUID": f"{s1},{s2}"}))) == sorted([s1, s2])
    assert sorted(study(search(http, "/studies", {"StudyInstanceUID": f"{s2}\\{s3}"}))) == sorted([s2, s3])
    assert sorted(study(search(http, "/studies", {"StudyInstanceUID": f"{s3},{new_uid()}"}))) == [s3]
    series = search(http, "/series", {"SeriesInstanceUID": f"{a.SeriesInstanceUID},{c.SeriesInstanceUID}"})
    assert sorted(values(series, "SeriesInstanceUID")) == sorted([a.SeriesInstanceUID, c.SeriesInstanceUID])
    found = search(http, "/series", {"StudyInstanceUID": f"{s1}\\{s3}"})
    assert sorted(values(found, "SeriesInstanceUID")) == sorted(
        [a.SeriesInstanceUID, c.SeriesInstanceUID, d.SeriesInstanceUID]
    )
    found = search(http, "/instances", {"SOPInstanceUID": f"{a.SOPInstanceUID}\\{b.SOPInstanceUID}"})
    assert sorted(values(found, "SOPInstanceUID")) == sorted([a.SOPInstanceUID, b.SOPInstanceUID])
    found = search(http, f"/studies/{s1}/instances", {"SOPInstanceUID": f"{a.SOPInstanceUID},{b.SOPInstanceUID}"})
    assert values(found, "SOPInstanceUID") == [a.SOPInstanceUID]  # b is in another study
    found = search(http, f"/studies/{s1}/series", {"SeriesInstanceUID": f"{a.SeriesInstanceUID},{d.SeriesInstanceUID}"})
    assert sorted(values(found, "SeriesInstanceUID")) == sorted([a.SeriesInstanceUID, d.SeriesInstanceUID])
    # an invalid UID (alone, in a list, or with a wildcard) is a bad request, not an empty match
    assert "'abc' is invalid" in rejected(http, "/studies", {"StudyInstanceUID": f"{s1},abc"})
    rejected(http, "/studies", {"StudyInstanceUID": "abc"})
    rejected(http, "/series", {"SeriesInstanceUID": "1.2.*"})
    assert "empty string value" in rejected(http, "/studies", {"StudyInstanceUID": ","})
    # through dicomweb_client (the comma is percent-encoded)
    client = DICOMwebClient(url=f"{server.url}/v2")
    found = client.search_for_studies(search_filters={"StudyInstanceUID": f"{s1},{s3}"})
    assert sorted(study(found)) == sorted([s1, s3])


def test_modalities_in_study_filter(server, http):
    pid = f"PID-{token()}"
    ct_mr = new_uid()
    store(
        http,
        make_dataset(study=ct_mr, PatientID=pid, Modality="CT"),
        make_dataset(study=ct_mr, PatientID=pid, Modality="MR"),
    )
    us = make_dataset(PatientID=pid, Modality="US")
    store(http, us)
    s_us = us.StudyInstanceUID

    def found(modalities, path="/studies"):
        return sorted(set(study(search(http, path, {"PatientID": pid, "ModalitiesInStudy": modalities}))))

    assert found("MR") == [ct_mr]
    assert found("ct") == [ct_mr]
    assert found("US") == [s_us]
    assert found("XA") == []
    assert found("US,MR") == sorted([ct_mr, s_us])
    assert found("CT\\US") == sorted([ct_mr, s_us])
    assert found("XA,CT") == [ct_mr]
    assert "empty string value" in rejected(http, "/studies", {"ModalitiesInStudy": ",\\"})
    # the filter makes the computed attribute part of the answer
    result = search(http, "/studies", {"PatientID": pid, "ModalitiesInStudy": "MR"})
    assert result[0][key("ModalitiesInStudy")] == {"vr": "CS", "Value": ["CT", "MR"]}
    # at series level it selects every series of matching studies
    assert len(search(http, "/series", {"PatientID": pid, "ModalitiesInStudy": "MR"})) == 2
    client = DICOMwebClient(url=f"{server.url}/v2")
    result = client.search_for_studies(search_filters={"PatientID": pid, "ModalitiesInStudy": "MR,US"})
    assert sorted(study(result)) == sorted([ct_mr, s_us])


# -- DA ranges --------------------------------------------------------------------------------------------------------
def test_date_ranges(server, http):
    pid = f"PID-{token()}"
    dates = ["20191231", "20200101", "20200615", "20201231", "20210101"]
    births = ["19591231", "19600101", "19700101", "19800101", "19900101"]
    datasets = [
        make_dataset(PatientID=pid, StudyDate=d, PatientBirthDate=b, PerformedProcedureStepStartDate=d)
        for d, b in zip(dates, births, strict=True)
    ]
    datasets.append(make_dataset(PatientID=pid, StudyDate=None))  # no date: never in a range
    store(http, *datasets)

    def dates_of(params, path="/studies", keyword="StudyDate"):
        return sorted(values(search(http, path, {"PatientID": pid, **params}), keyword))

    assert dates_of({"StudyDate": "20200101-20201231"}) == ["20200101", "20200615", "20201231"]
    assert dates_of({"StudyDate": "20200101-"}) == ["20200101", "20200615", "20201231", "20210101"]
    assert dates_of({"StudyDate": "-20200101"}) == ["20191231", "20200101"]
    assert dates_of({"StudyDate": "20200615"}) == ["20200615"]
    assert dates_of({"StudyDate": "20200615-20200615"}) == ["20200615"]
    assert dates_of({"StudyDate": "20200102-20200614"}) == []
    assert dates_of({"PatientBirthDate": "19600101-19800101"}, keyword="PatientBirthDate") == [
        "19600101",
        "19700101",
        "19800101",
    ]
    assert dates_of({"PatientBirthDate": "-19600101"}, keyword="PatientBirthDate") == ["19591231", "19600101"]
    pps = "PerformedProcedureStepStartDate"
    assert dates_of({pps: "20201231-"}, "/series", pps) == ["20201231", "20210101"]
    assert dates_of({pps: "20200101-20200615"}, "/instances", pps) == ["20200101", "20200615"]
    # a date range and an exact date together
    assert dates_of({"StudyDate": "20190101-", "PatientBirthDate": "19700101"}) == ["20200615"]


def test_date_errors(server, http):
    assert "Both parts in the range cannot be empty" in rejected(http, "/studies", {"StudyDate": "-"})
    assert rejected(http, "/studies", {"StudyDate": "2020"}) == (
        "Invalid query: specified Date value '2020' is invalid for attribute 'StudyDate'. "
        "Date should be valid and formatted as yyyyMMdd."
    )
    rejected(http, "/studies", {"StudyDate": "20201231-20200101"})  # reversed range
    for bad in (
        "20201301",
        "20200230",
        "2020-01-01",
        "20200101-2021",
        "abc",
        "20200101-20200102-20200103",
        "20200101\n",
        "２０２００１０１",
    ):
        assert "Date should be valid and formatted as yyyyMMdd." in rejected(http, "/studies", {"StudyDate": bad})
    assert "'PatientBirthDate'" in rejected(http, "/studies", {"PatientBirthDate": "1980"})
    assert "'PerformedProcedureStepStartDate'" in rejected(
        http, "/series", {"PerformedProcedureStepStartDate": "202001011"}
    )


# -- fuzzy matching ----------------------------------------------------------------------------------------------------
def test_fuzzy_matching_prefix_words_on_person_names(server, http):
    pid = f"PID-{token()}"
    doe = make_dataset(PatientID=pid, PatientName="John^Doe", ReferringPhysicianName="Jane^Roe")
    ohner = make_dataset(PatientID=pid, PatientName="Mary^Ohner", ReferringPhysicianName="Ann^Ohnesorg")
    store(http, doe, ohner)

    def fuzzy(attribute, query, path="/studies"):
        params = {"PatientID": pid, attribute: query, "fuzzymatching": "true"}
        return sorted(set(study(search(http, path, params))))

    for query in ("joh", "do", "jo do", "Doe", "John Doe", "doe john", "JOHN^DOE", "j"):
        assert fuzzy("PatientName", query) == [doe.StudyInstanceUID], query
    assert fuzzy("PatientName", "ohn") == [ohner.StudyInstanceUID]  # Ohner, not John
    assert fuzzy("PatientName", "oe") == []
    assert fuzzy("PatientName", "john mary") == []
    for query in ("jan", "ro", "Jane Roe"):
        assert fuzzy("ReferringPhysicianName", query) == [doe.StudyInstanceUID], query
    assert fuzzy("ReferringPhysicianName", "ohnes") == [ohner.StudyInstanceUID]
    assert fuzzy("ReferringPhysicianName", "ane") == []
    # at series and instance level
    assert fuzzy("PatientName", "do", "/series") == [doe.StudyInstanceUID]
    assert fuzzy("PatientName", "do", "/instances") == [doe.StudyInstanceUID]
    # without fuzzymatching (or with false) the match is exact
    assert search(http, "/studies", {"PatientID": pid, "PatientName": "joh"}) == []
    assert search(http, "/studies", {"PatientID": pid, "PatientName": "joh", "fuzzymatching": "false"}) == []
    assert study(search(http, "/studies", {"PatientID": pid, "PatientName": "john^doe", "FuzzyMatching": "FALSE"})) == [
        doe.StudyInstanceUID
    ]
    # fuzzy does not apply to non-PN attributes
    assert search(http, "/studies", {"PatientID": pid[:8], "fuzzymatching": "true"}) == []
    client = DICOMwebClient(url=f"{server.url}/v2")
    found = client.search_for_studies(search_filters={"PatientID": pid, "PatientName": "jo do"}, fuzzymatching=True)
    assert study(found) == [doe.StudyInstanceUID]


def test_fuzzy_matching_errors(server, http):
    assert "empty string value" in rejected(http, "/studies", {"PatientName": "^ ^", "fuzzymatching": "true"})
    assert "fuzzymatching" in rejected(http, "/studies", {"PatientName": "x", "fuzzymatching": "maybe"}).lower()
    rejected(http, "/studies", {"PatientName": 'jo"hn', "fuzzymatching": "true"})
    rejected(http, "/studies", {"fuzzymatching": "1"})


# -- includefield and computed attributes --------------------------------------------------------------------------
def _private(ds: Dataset, text: str) -> Dataset:
    ds.private_block(0x0009, "DICOMHUB TEST", create=True).add_new(0x10, "LO", text)
    return ds


def test_includefield_forms(server, http):
    tok = token()
    ds = _private(make_dataset(AccessionNumber=f"INC{tok}", ImageComments="comment-1", ProtocolName="Proto A"), "p")
    store(http, ds)
    base = {"AccessionNumber": f"INC{tok}"}
    default = set(search(http, "/studies", base)[0])
    assert key("ImageComments") not in default and "00181030" not in default

    def extra(path, *include):
        return set(search(http, path, [*base.items(), *(("includefield", i) for i in include)])[0]) - default

    assert extra("/studies", "ImageComments") == keys("ImageComments")
    assert extra("/studies", "00181030") == {"00181030"}
    assert extra("/studies", "00181030,ImageComments") == {"00181030", key("ImageComments")}
    assert extra("/studies", "ImageComments", "00181030") == {"00181030", key("ImageComments")}
    assert extra("/studies", "00091010") == {"00091010"}  # private, by hex
    assert extra("/studies", "PatientSex") == set()  # valid but absent from the stored metadata
    item = search(http, "/instances", [*base.items(), ("includefield", "ImageComments"), ("includefield", "00181030")])
    assert value(item[0], "ImageComments") == "comment-1"
    assert value(item[0], "ProtocolName") == "Proto A"
    item = search(http, "/studies", [*base.items(), ("includefield", "00091010")])
    assert item[0]["00091010"]["Value"] == ["p"]
    # names of control parameters are case-insensitive
    assert key("ImageComments") in search(http, "/studies", {**base, "IncludeField": "ImageComments"})[0]


def test_includefield_errors(server, http):
    assert "'all'" in rejected(http, "/studies", {"includefield": "all,PatientSex"})
    assert "'all'" in rejected(http, "/studies", [("includefield", "PatientSex"), ("includefield", "all")])
    assert "NotAKeyword" in rejected(http, "/studies", {"includefield": "NotAKeyword"})
    rejected(http, "/studies", {"includefield": "patientsex"})
    rejected(http, "/studies", {"includefield": "0010004"})


def test_computed_attributes(server, http):
    s = new_uid()
    ct, mr = new_uid(), new_uid()
    pid = f"PID-{token()}"
    store(
        http,
        make_dataset(study=s, series=ct, PatientID=pid, Modality="CT"),
        make_dataset(study=s, series=mr, PatientID=pid, Modality="MR"),
        make_dataset(study=s, series=ct, PatientID=pid, Modality="CT"),
        make_dataset(study=s, series=new_uid(), PatientID=pid, Modality="CT"),
    )
    computed = ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]
    result = search(http, "/studies", [("PatientID", pid), ("includefield", ",".join(computed))])
    assert result[0][key("NumberOfStudyRelatedSeries")] == {"vr": "IS", "Value": [3]}
    assert result[0][key("NumberOfStudyRelatedInstances")] == {"vr": "IS", "Value": [4]}
    assert result[0][key("ModalitiesInStudy")] == {"vr": "CS", "Value": ["CT", "MR"]}
    # v1 returns them only when asked (Azure's default set); v2 by default (PS3.18's default set), the same values
    plain = search(http, "/studies", {"PatientID": pid}, "v1")[0]
    assert not set(plain) & keys(*computed)
    by_default = search(http, "/studies", {"PatientID": pid})[0]
    assert {k: by_default[k] for k in keys(*computed)} == {k: result[0][k] for k in keys(*computed)}
    series = search(http, f"/studies/{s}/series", {"includefield": "NumberOfSeriesRelatedInstances"}, "v1")
    counts = {value(r, "SeriesInstanceUID"): value(r, "NumberOfSeriesRelatedInstances") for r in series}
    assert counts[ct] == 2 and counts[mr] == 1 and len(counts) == 3
    assert not set(search(http, f"/studies/{s}/series", version="v1")[0]) & COMPUTED_SERIES
    series = search(http, f"/studies/{s}/series")
    assert {value(r, "SeriesInstanceUID"): value(r, "NumberOfSeriesRelatedInstances") for r in series} == counts
    series = search(http, "/series", {"PatientID": pid, "includefield": "00201209", "Modality": "MR"})
    assert [value(r, "NumberOfSeriesRelatedInstances") for r in series] == [1]
    client = DICOMwebClient(url=f"{server.url}/v2")
    found = client.search_for_studies(search_filters={"PatientID": pid}, fields=computed)
    assert value(found[0], "NumberOfStudyRelatedInstances") == 4


# -- default attribute sets (spec 4.5) ------------------------------------------------------------------------------
STUDY_V2 = keys(
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
)
SERIES_V2 = keys("SeriesInstanceUID", "Modality", "PerformedProcedureStepStartDate", "ManufacturerModelName")
INSTANCE_V2 = keys("SOPInstanceUID")
STUDY_V1 = keys(
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyInstanceUID",
)
SERIES_V1 = keys(
    "SpecificCharacterSet",
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "SeriesInstanceUID",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
INSTANCE_V1 = keys(
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
STUDY_ALL_EXTRAS = keys(
    "StudyDescription",
    "AnatomicRegionsInStudyCodeSequence",
    "ProcedureCodeSequence",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "ReferencedStudySequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
)
SERIES_ALL_EXTRAS = keys("SeriesNumber", "Laterality", "SeriesDate", "SeriesTime")
COMPUTED_STUDY = keys("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
COMPUTED_SERIES = keys("NumberOfSeriesRelatedInstances")


def _code(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99TEST", value
    return item


def rich_dataset() -> Dataset:
    """An instance carrying every attribute of the v1, v2 and `all` sets, plus some in none of them."""
    tok = token()
    request = Dataset()
    request.RequestedProcedureID = "RP1"
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    reference.ReferencedSOPInstanceUID = new_uid()
    return make_dataset(
        frames=2,
        SpecificCharacterSet="ISO_IR 192",
        PatientID=f"PID-{tok}",
        PatientName="Rich^Dataset",
        PatientBirthDate="19700101",
        PatientSex="F",
        PatientAge="054Y",
        PatientSize="1.7",
        PatientWeight="65",
        Occupation="Tester",
        AdditionalPatientHistory="none",
        StudyDate="20220101",
        StudyTime="101010",
        StudyID="S1",
        StudyDescription="Rich study",
        AccessionNumber=f"RICH{tok}",
        ReferringPhysicianName="Ref^Doc",
        NameOfPhysiciansReadingStudy="Read^Doc",
        AdmittingDiagnosesDescription="diag",
        InstanceAvailability="ONLINE",
        TimezoneOffsetFromUTC="+0100",
        AnatomicRegionsInStudyCodeSequence=[_code("T-A0100")],
        ProcedureCodeSequence=[_code("P1")],
        ReferencedStudySequence=[reference],
        Modality="MR",
        SeriesDescription="Rich series",
        SeriesNumber="7",
        SeriesDate="20220101",
        SeriesTime="101500",
        Laterality="R",
        PerformedProcedureStepStartDate="20220101",
        PerformedProcedureStepStartTime="101000",
        ManufacturerModelName="RichModel",
        RequestAttributesSequence=[request],
        InstanceNumber="3",
        ImageComments="not in any default set",
        BodyPartExamined="HEAD",
    )


@pytest.fixture(scope="module")
def rich(server) -> Dataset:
    ds = rich_dataset()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        store(client, ds)
    return ds


def test_v2_default_attribute_sets(rich, http):
    ds = rich
    s, se = ds.StudyInstanceUID, ds.SeriesInstanceUID
    pid = {"PatientID": ds.PatientID}
    patient_id = keys("PatientID")
    uids = keys("StudyInstanceUID", "SeriesInstanceUID")
    # PS3.18's computed defaults are added to the rows of their own level (spec 5.13: an added attribute is not a
    # breaking change); v1 keeps Azure's set
    assert set(search(http, "/studies", pid)[0]) == STUDY_V2 | COMPUTED_STUDY
    assert set(search(http, "/series", pid)[0]) == STUDY_V2 | SERIES_V2 | COMPUTED_SERIES
    assert set(search(http, "/instances", pid)[0]) == STUDY_V2 | SERIES_V2 | INSTANCE_V2
    assert set(search(http, f"/studies/{s}/series")[0]) == SERIES_V2 | COMPUTED_SERIES | keys("StudyInstanceUID")
    assert set(search(http, f"/studies/{s}/instances")[0]) == SERIES_V2 | INSTANCE_V2 | keys("StudyInstanceUID")
    assert set(search(http, f"/studies/{s}/series/{se}/instances")[0]) == INSTANCE_V2 | uids
    # filter attributes are added to the answer
    found = search(http, f"/studies/{s}/series/{se}/instances", {"SOPInstanceUID": ds.SOPInstanceUID})
    assert set(found[0]) == INSTANCE_V2 | uids
    assert patient_id <= STUDY_V2


def test_v1_default_attribute_sets(rich, http):
    ds = rich
    s, se = ds.StudyInstanceUID, ds.SeriesInstanceUID
    pid = {"PatientID": ds.PatientID}
    study_uid = keys("StudyInstanceUID")
    assert set(search(http, "/studies", pid, "v1")[0]) == STUDY_V1
    assert set(search(http, "/series", pid, "v1")[0]) == STUDY_V1 | SERIES_V1
    assert set(search(http, "/instances", pid, "v1")[0]) == STUDY_V1 | SERIES_V1 | INSTANCE_V1
    assert set(search(http, f"/studies/{s}/series", version="v1")[0]) == SERIES_V1 | study_uid
    assert set(search(http, f"/studies/{s}/instances", version="v1")[0]) == SERIES_V1 | INSTANCE_V1 | study_uid
    found = search(http, f"/studies/{s}/series/{se}/instances", version="v1")
    assert set(found[0]) == INSTANCE_V1 | keys("StudyInstanceUID", "SeriesInstanceUID")
    # the v1 prerelease alias behaves as v1
    assert set(search(http, "/studies", pid, "v1.0-prerelease")[0]) == STUDY_V1
    # a v1 filter on a non-default attribute adds it
    assert set(search(http, "/studies", {**pid, "StudyDescription": "Rich study"}, "v1")[0]) == STUDY_V1 | keys(
        "StudyDescription"
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_includefield_all(rich, http, version):
    ds = rich
    pid = [("PatientID", ds.PatientID), ("includefield", "all")]
    study_all = STUDY_V1 | STUDY_ALL_EXTRAS | COMPUTED_STUDY
    series_all = SERIES_V1 | SERIES_ALL_EXTRAS | COMPUTED_SERIES
    studies = search(http, "/studies", pid, version)
    assert set(studies[0]) == study_all
    assert value(studies[0], "NumberOfStudyRelatedInstances") == 1
    assert key("ManufacturerModelName") not in series_all
    assert set(search(http, "/series", pid, version)[0]) == (study_all - COMPUTED_STUDY) | series_all
    assert (
        set(search(http, "/instances", pid, version)[0])
        == (study_all - COMPUTED_STUDY) | (series_all - COMPUTED_SERIES) | INSTANCE_V1
    )
    found = search(http, f"/studies/{ds.StudyInstanceUID}/series", {"includefield": "all"}, version)
    assert set(found[0]) == series_all | keys("StudyInstanceUID")
    assert value(found[0], "NumberOfSeriesRelatedInstances") == 1
    assert key("ImageComments") not in found[0]


# -- paging and request validation ---------------------------------------------------------------------------------
def test_paging_through_seven_studies(server, http):
    pid = f"PID-{token()}"
    stored = []
    for _ in range(7):
        ds = make_dataset(PatientID=pid)
        store(http, ds)  # one request each: store order is the newest-first order
        stored.append(ds.StudyInstanceUID)
    newest_first = stored[::-1]
    pages = [study(search(http, "/studies", {"PatientID": pid, "limit": 3, "offset": o})) for o in (0, 3, 6)]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert pages[0] + pages[1] + pages[2] == newest_first
    assert search(http, "/studies", {"PatientID": pid, "limit": 3, "offset": 7}) == []
    assert search(http, "/studies", {"PatientID": pid, "offset": 1000}) == []
    assert search(http, "/studies", {"PatientID": pid, "offset": 2**63 - 1}) == []
    assert study(search(http, "/studies", {"PatientID": pid, "LIMIT": "1", "Offset": "2"})) == [newest_first[2]]
    assert study(search(http, "/studies", {"PatientID": pid, "limit": 200})) == newest_first
    assert study(search(http, "/studies", {"PatientID": pid})) == newest_first  # default limit 100
    client = DICOMwebClient(url=f"{server.url}/v2")
    assert study(client.search_for_studies(search_filters={"PatientID": pid}, limit=2, offset=5)) == newest_first[5:]
    everything = client.search_for_studies(search_filters={"PatientID": pid}, limit=3, get_remaining=True)
    assert study(everything) == newest_first
    # instances page the same way
    found = search(http, "/instances", {"PatientID": pid, "limit": 4, "offset": 4})
    assert values(found, "StudyInstanceUID") == newest_first[4:]


def test_limit_and_offset_errors(server, http):
    for bad in ("0", "201", "abc", "-1", "1.5", "", "1_0", " 5", "１", "99999999999999999999999"):
        text = rejected(http, "/studies", {"limit": bad})
        assert text == "The query parameter 'Limit' is invalid. The field Limit must be between 1 and 200.", bad
    for bad in ("-1", "x"):
        assert "Offset" in rejected(http, "/studies", {"offset": bad})
    assert "limit" in rejected(http, "/instances", {"limit": "201"}).lower()
    # control parameters given twice
    assert "more than once" in rejected(http, "/studies", [("limit", "1"), ("limit", "2")])
    assert "more than once" in rejected(http, "/studies", [("offset", "1"), ("Offset", "1")])
    assert "more than once" in rejected(http, "/studies", [("fuzzymatching", "true"), ("fuzzymatching", "true")])


def test_no_match_is_204_with_empty_body(server, http):
    response = http.get("/v2/studies", params={"PatientID": f"NONE-{token()}"}, headers=DICOM_JSON)
    assert response.status_code == 204 and response.content == b""
    response = http.get(f"/v2/studies/{new_uid()}/series", headers=DICOM_JSON)
    assert response.status_code == 204 and response.content == b""


def test_invalid_query_strings(server, http):
    message = "The query string included invalid characters."
    for query in ("?<script>", "?PatientID=%3cscript%3e", "?PatientID=%3Cx", "?PatientName=a<b"):
        response = http.get("/v2/studies" + query, headers=DICOM_JSON)
        assert (response.status_code, response.text) == (400, message), query
    assert "empty string value" in rejected(http, "/studies", {"PatientID": ""})
    assert "empty string value" in rejected(http, "/studies", {"PatientID": "   "})
    assert "empty string value" in rejected(http, "/studies", "PatientID")
    # NUL padding alone is not an empty value: it matches the (never indexed) empty string
    assert search(http, "/studies", {"AccessionNumber": "\0"}) == []
    assert "Duplicate" in rejected(http, "/series", [("Modality", "CT"), ("Modality", "MR")])


def test_accept_header(server, http):
    ds = make_dataset()
    store(http, ds)
    path = f"/v2/studies?StudyInstanceUID={ds.StudyInstanceUID}"
    for accept in ("application/dicom", "application/octet-stream", "application/dicom+json+x", "image/jpeg"):
        response = http.get(path, headers={"Accept": accept})
        assert (response.status_code, response.content) == (406, b""), accept
    # the Accept check comes before the request's own validation
    assert http.get("/v2/studies/not-a-uid/series", headers={"Accept": "application/dicom"}).status_code == 406
    assert http.get("/v2/studies?Modality=CT", headers={"Accept": "application/dicom"}).status_code == 406
    request = http.build_request("GET", path)
    del request.headers["Accept"]
    response = http.send(request)
    assert response.status_code == 406
    for accept in ("*/*", "application/*", "application/json", "application/DICOM+JSON", "image/png, */*;q=0.1"):
        response = http.get(path, headers={"Accept": accept})
        assert response.status_code == 200, accept
        assert study(response.json()) == [ds.StudyInstanceUID]


# -- study-level values after several instances ------------------------------------------------------------------------
def test_latest_instance_values_win(server, http):
    tok = token()
    pid = f"PID-{tok}"
    s, se = new_uid(), new_uid()
    first = make_dataset(
        study=s,
        series=se,
        PatientID=pid,
        PatientName="Oldname^Alice",
        ReferringPhysicianName="Oldref^Bob",
        StudyDescription=f"OLD {tok}",
        ManufacturerModelName="OldModel",
    )
    store(http, first)
    second = make_dataset(
        study=s,
        series=se,
        PatientID=pid,
        PatientName="Newname^Alice",
        ReferringPhysicianName="Newref^Bob",
        StudyDescription=f"NEW {tok}",
        ManufacturerModelName="NewModel",
    )
    store(http, second)
    found = search(http, "/studies", {"PatientID": pid})
    assert value(found[0], "PatientName") == "Newname^Alice"
    assert value(found[0], "StudyDescription") == f"NEW {tok}"
    assert study(search(http, "/studies", {"PatientID": pid, "PatientName": "newname^alice"})) == [s]
    assert search(http, "/studies", {"PatientID": pid, "PatientName": "oldname^alice"}) == []
    assert search(http, "/studies", {"PatientID": pid, "StudyDescription": f"OLD {tok}"}) == []
    # fuzzy matching follows the latest name too
    assert search(http, "/studies", {"PatientID": pid, "PatientName": "oldn", "fuzzymatching": "true"}) == []
    assert search(http, "/studies", {"PatientID": pid, "ReferringPhysicianName": "oldr", "fuzzymatching": "true"}) == []
    assert study(search(http, "/studies", {"PatientID": pid, "PatientName": "newn al", "fuzzymatching": "true"})) == [s]
    assert study(search(http, "/studies", {"PatientID": pid, "PatientName": "ali", "fuzzymatching": "true"})) == [s]
    assert values(search(http, f"/studies/{s}/series", {"ManufacturerModelName": "newmodel"}), "SeriesInstanceUID") == [
        se
    ]
    assert search(http, f"/studies/{s}/series", {"ManufacturerModelName": "OldModel"}) == []
    # instance-level rows keep their own metadata
    instances = search(http, f"/studies/{s}/instances", {"includefield": "PatientName"})
    assert sorted(values(instances, "PatientName")) == ["Newname^Alice", "Oldname^Alice"]


def test_empty_patient_id_in_v2_does_not_blank_study(server, http):
    pid = f"PID-{token()}"
    s = new_uid()
    store(http, make_dataset(study=s, PatientID=pid))
    store(http, make_dataset(study=s, PatientID=""), expect=(200, 202))
    store(http, make_dataset(study=s, PatientID=None), expect=(200, 202))
    assert study(search(http, "/studies", {"PatientID": pid})) == [s]
    assert len(search(http, "/instances", {"PatientID": pid})) == 3
    assert (
        value(
            search(http, "/studies", {"PatientID": pid, "includefield": "NumberOfStudyRelatedInstances"})[0],
            "NumberOfStudyRelatedInstances",
        )
        == 3
    )


def test_study_values_after_deleting_the_latest_instance(server, http):
    tok = token()
    pid = f"PID-{tok}"
    s = new_uid()
    older = make_dataset(study=s, PatientID=pid, PatientName="Older^Name", AccessionNumber=f"O{tok}")
    newer = make_dataset(study=s, PatientID=pid, PatientName="Newer^Name", AccessionNumber=f"N{tok}")
    store(http, older)
    store(http, newer)
    assert http.delete(f"/v2/studies/{s}/series/{newer.SeriesInstanceUID}").status_code == 204
    found = search(http, "/studies", {"PatientID": pid})
    assert values(found, "PatientName") == ["Older^Name"]
    assert study(search(http, "/studies", {"AccessionNumber": f"O{tok}"})) == [s]
    assert search(http, "/studies", {"AccessionNumber": f"N{tok}"}) == []
    assert search(http, "/studies", {"PatientID": pid, "PatientName": "newer", "fuzzymatching": "true"}) == []
