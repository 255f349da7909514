"""Worklist push and pull (UPS-RS, spec 5.8) through real HTTP on SQLite and PostgreSQL: every route, Azure's create
rules and codes, the whole state transition table, search matching and paging, and concurrent claims and updates."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.factory import new_uid

DICOM_JSON = "application/dicom+json"
SEND = {"Content-Type": DICOM_JSON, "Accept": DICOM_JSON}
BASE = "/v2"


def code(value: str, meaning: str) -> dict:
    return {
        "00080100": {"vr": "SH", "Value": [value]},
        "00080102": {"vr": "SH", "Value": ["DCM"]},
        "00080104": {"vr": "LO", "Value": [meaning]},
    }


def workitem_dataset(
    patient_id: str = "P1",
    name: str = "Last^First",
    station: str = "CT_1",
    accession: str = "ACC1",
    start: str = "20211202115531.193",
) -> dict:
    """Every Type 1 and Type 2 attribute of PS3.4 Table CC.2.5-3 for create (spec 5.8), as Azure's collection sends."""
    return {
        "00081080": {"vr": "LO", "Value": ["Admitting Diagnoses Description"]},
        "00081084": {"vr": "SQ", "Value": [{"00080104": {"vr": "LO", "Value": ["Code Meaning"]}}]},
        "00081195": {"vr": "UI"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
        "00100030": {"vr": "DA", "Value": ["20000101"]},
        "00100040": {"vr": "CS", "Value": ["F"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3.4.5"]},
        "00101002": {"vr": "SQ"},
        "00380010": {"vr": "LO", "Value": ["11111"]},
        "00380014": {"vr": "SQ", "Value": [{}]},
        "00400400": {"vr": "LT"},
        "00404005": {"vr": "DT", "Value": [start]},
        "00404018": {"vr": "SQ", "Value": [code("ABC123", "Requested procedure")]},
        "00404021": {"vr": "SQ"},
        "00404025": {"vr": "SQ", "Value": [code(station, "Station name"), code("OTHER_1", "Station name")]},
        "00404026": {"vr": "SQ", "Value": [code("CLASS", "Station class")]},
        "00404027": {"vr": "SQ", "Value": [code("LOC", "Geographic location")]},
        "00404041": {"vr": "CS", "Value": ["READY"]},
        "0040A370": {
            "vr": "SQ",
            "Value": [
                {
                    "00080050": {"vr": "SH", "Value": [accession]},
                    "00080051": {"vr": "SQ"},
                    "0020000D": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                    "00321060": {"vr": "LO", "Value": ["Requested procedure description"]},
                    "00321064": {"vr": "SQ", "Value": [code("GHI123", "Requested procedure")]},
                    "00400026": {"vr": "SQ"},
                    "00400027": {"vr": "SQ"},
                    "00401001": {"vr": "SH", "Value": ["RP-" + accession]},
                }
            ],
        },
        "00741000": {"vr": "CS", "Value": ["SCHEDULED"]},
        "00741002": {"vr": "SQ"},
        "00741200": {"vr": "CS", "Value": ["MEDIUM"]},
        "00741204": {"vr": "LO", "Value": ["Scheduled procedure step description"]},
        "00741210": {"vr": "SQ"},
        "00741216": {"vr": "SQ"},
        "0040E020": {"vr": "CS", "Value": ["Type of Instances"]},  # 17 characters: Azure keeps unchecked values
    }


PERFORMED = {
    "00741216": {
        "vr": "SQ",
        "Value": [
            {
                "00404028": {"vr": "SQ", "Value": [code("CT_1", "Station name")]},
                "00404050": {"vr": "DT", "Value": ["20211202120000"]},
                "00404019": {"vr": "SQ", "Value": [code("ABC123", "Performed")]},
                "00404051": {"vr": "DT", "Value": ["20211202130000"]},
                "00404033": {"vr": "SQ"},
            }
        ],
    }
}
CANCEL_PROGRESS = {
    "00741002": {
        "vr": "SQ",
        "Value": [
            {
                "00404052": {"vr": "DT", "Value": ["20211202130000"]},
                "0074100E": {"vr": "SQ", "Value": [code("110514", "Incorrect worklist entry selected")]},
            }
        ],
    }
}


def create(http: httpx.Client, uid: str | None = None, dataset: dict | None = None, base: str = BASE) -> httpx.Response:
    path = f"{base}/workitems" + (f"?{uid}" if uid else "")
    return http.post(path, content=json.dumps([dataset or workitem_dataset()]), headers=SEND)


def new_workitem(http: httpx.Client, base: str = BASE, **values: str) -> str:
    uid = new_uid()
    response = create(http, uid, workitem_dataset(**values), base)
    assert response.status_code == 201, response.text
    return uid


def change_state(http: httpx.Client, uid: str, state: str, transaction: str, base: str = BASE) -> httpx.Response:
    body = [{"00741000": {"vr": "CS", "Value": [state]}, "00081195": {"vr": "UI", "Value": [transaction]}}]
    return http.put(f"{base}/workitems/{uid}/state", content=json.dumps(body), headers=SEND)


def update(http: httpx.Client, uid: str, dataset: dict, transaction: str | None = None) -> httpx.Response:
    path = f"{BASE}/workitems/{uid}" + (f"?{transaction}" if transaction else "")
    return http.post(path, content=json.dumps([dataset]), headers=SEND)


def cancel(http: httpx.Client, uid: str, dataset: dict | None = None, base: str = BASE) -> httpx.Response:
    return http.post(f"{base}/workitems/{uid}/cancelrequest", content=json.dumps([dataset or {}]), headers=SEND)


def retrieve(http: httpx.Client, uid: str) -> dict:
    response = http.get(f"{BASE}/workitems/{uid}", headers={"Accept": DICOM_JSON})
    assert response.status_code == 200, response.text
    return response.json()


def search(http: httpx.Client, query: str) -> httpx.Response:
    return http.get(f"{BASE}/workitems?{query}", headers={"Accept": DICOM_JSON})


def uids_of(response: httpx.Response) -> list[str]:
    return [] if response.status_code == 204 else [r["00080018"]["Value"][0] for r in response.json()]


def value(dataset: dict, key: str):
    return dataset[key]["Value"][0]


# -- create and retrieve ----------------------------------------------------------------------------------------------
def test_create_sets_the_server_attributes_and_retrieve_hides_the_transaction(http):
    uid = new_uid()
    response = create(http, uid)
    assert response.status_code == 201 and response.content == b""
    assert response.headers["location"] == str(http.base_url).rstrip("/") + f"/v2/workitems/{uid}"
    assert response.headers["content-location"] == response.headers["location"]
    stored = retrieve(http, uid)
    assert value(stored, "00080016") == "1.2.840.10008.5.1.4.34.6.1"  # UPS Push SOP Class
    assert value(stored, "00080018") == uid
    assert value(stored, "00741000") == "SCHEDULED"
    assert value(stored, "00741202") == "worklist"  # Azure overwrites the client's WorklistLabel
    assert len(value(stored, "00404010")) >= 14  # ScheduledProcedureStepModificationDateTime set by the server
    assert "00081195" not in stored
    assert value(stored, "0040E020") == "Type of Instances"

    again = create(http, uid)
    assert again.status_code == 409 and again.headers["content-type"] == "application/json"
    assert again.json() == f"The workitem instance '{uid}' already exists."


def test_the_uid_comes_from_the_query_or_the_dataset_and_they_must_agree(http):
    in_body = new_uid()
    dataset = {**workitem_dataset(), "00080018": {"vr": "UI", "Value": [in_body]}}
    assert create(http, None, dataset).status_code == 201
    assert value(retrieve(http, in_body), "00080018") == in_body
    mismatch = create(http, new_uid(), dataset)
    assert mismatch.status_code == 400
    assert mismatch.json() == "SOPInstanceUID in the payload does not match the workitem query parameter."
    assert "UID is missing" in create(http, None).json()
    bad = create(http, "1.2.abc")
    assert bad.status_code == 400 and "'1.2.abc' is invalid" in bad.json()
    reserved = create(http, "1.2.840.10008.5.1.4.34.5")
    assert reserved.status_code == 400 and "reserved" in reserved.json()


def _without(key: str) -> dict:
    dataset = workitem_dataset()
    del dataset[key]
    return dataset


def _emptied(key: str) -> dict:
    return {**workitem_dataset(), key: {"vr": workitem_dataset()[key]["vr"]}}


def _request_item(change: dict, drop: str | None = None) -> dict:
    dataset = workitem_dataset()
    item = dataset["0040A370"]["Value"][0]
    item.update(change)
    if drop:
        del item[drop]
    return dataset


CREATE_RULES = [
    # (dataset, words the 400 message must hold)
    (_without("00741204"), "ProcedureStepLabel (0074,1204) is required but missing"),
    (_emptied("00741200"), "ScheduledProcedureStepPriority (0074,1200) is required to have a value but it is empty"),
    (_without("00404005"), "ScheduledProcedureStepStartDateTime (0040,4005) is required but missing"),
    (_emptied("00404041"), "InputReadinessState (0040,4041) is required to have a value"),
    (_without("00100010"), "PatientName (0010,0010) is required but missing"),  # Type 2: present, may be empty
    (_without("00081195"), "TransactionUID (0008,1195) is required but missing"),
    (_without("0040A370"), "ReferencedRequestSequence (0040,a370) is required but missing"),
    (
        {**workitem_dataset(), "00081195": {"vr": "UI", "Value": ["1.2.3"]}},
        "TransactionUID (0008,1195) must be empty",
    ),
    (
        {**workitem_dataset(), "00741000": {"vr": "CS", "Value": ["COMPLETED"]}},
        "ProcedureStepState (0074,1000) must be 'SCHEDULED'",
    ),
    (_request_item({}, drop="0020000D"), "StudyInstanceUID (0020,000d) in ReferencedRequestSequence"),
    (_request_item({}, drop="00080050"), "AccessionNumber (0008,0050) in ReferencedRequestSequence"),
    (
        {**workitem_dataset(), "00404025": {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["X"]}}]}},
        "CodeMeaning (0008,0104) in ScheduledStationNameCodeSequence",
    ),
    ({**workitem_dataset(), **CANCEL_PROGRESS}, "items of ProcedureStepProgressInformationSequence"),
    ({**workitem_dataset(), **PERFORMED}, "items of UnifiedProcedureStepPerformedProcedureSequence"),
    (
        {**workitem_dataset(), "00404005": {"vr": "DT", "Value": ["2021-12-02"]}},
        "ScheduledProcedureStepStartDateTime (0040,4005) is invalid",
    ),
]


def test_create_rules_of_table_cc_2_5_3(http):
    for dataset, message in CREATE_RULES:
        response = create(http, new_uid(), dataset)
        assert response.status_code == 400, (message, response.text)
        assert message in response.json(), response.text


def test_bodies_media_types_and_unknown_workitems(http):
    uid = new_workitem(http)
    wrong_type = http.post(
        f"{BASE}/workitems?{new_uid()}", content="[{}]", headers={**SEND, "Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415 and "'text/plain' is not supported" in wrong_type.json()
    not_json = http.post(f"{BASE}/workitems?{new_uid()}", content="[{", headers=SEND)
    assert not_json.status_code == 400 and not_json.json() == "The syntax of the request body is invalid."
    empty = http.post(f"{BASE}/workitems?{new_uid()}", content="[]", headers=SEND)
    assert empty.status_code == 400 and "JSON array" in empty.json()
    for accept in ("application/dicom", "application/dicom+json+something"):
        refused = http.get(f"{BASE}/workitems/{uid}", headers={"Accept": accept})
        assert refused.status_code == 406 and refused.content == b""
        assert create(http, new_uid()).status_code == 201
        assert http.post(f"{BASE}/workitems", content="[{}]", headers={**SEND, "Accept": accept}).status_code == 406
    missing = http.get(f"{BASE}/workitems/{new_uid()}", headers={"Accept": DICOM_JSON})
    assert missing.status_code == 404 and missing.json() == "The workitem instance is not found."
    assert http.get(f"{BASE}/workitems/1.2.x", headers={"Accept": DICOM_JSON}).status_code == 400
    assert update(http, new_uid(), {}).status_code == 400  # Azure's code: 400 for an unknown workitem (spec A.8)
    assert change_state(http, new_uid(), "IN PROGRESS", "1.2.3").status_code == 404  # C307
    unknown_cancel = cancel(http, new_uid())
    assert unknown_cancel.status_code == 404 and unknown_cancel.json() == "The workitem instance is not found."
    assert http.get("/v9/workitems", headers={"Accept": DICOM_JSON}).status_code == 404


# -- update and state -------------------------------------------------------------------------------------------------
def test_full_flow_update_claim_update_complete(http):
    uid = new_workitem(http)
    label = {"00741204": {"vr": "LO", "Value": ["New label"]}}
    updated = update(http, uid, label)
    assert updated.status_code == 200 and updated.headers["content-location"].endswith(f"/v2/workitems/{uid}")
    assert value(retrieve(http, uid), "00741204") == "New label"
    assert "C301" in update(http, uid, label, transaction="1.2.3").json()  # no transaction while SCHEDULED

    transaction = new_uid()
    assert change_state(http, uid, "IN PROGRESS", transaction).status_code == 200
    claimed = retrieve(http, uid)
    assert value(claimed, "00741000") == "IN PROGRESS" and "00081195" not in claimed
    assert "C302" in update(http, uid, label).json()  # the owner's transaction UID is now required
    assert "C301" in update(http, uid, label, transaction=new_uid()).json()
    not_allowed = update(http, uid, {"00100020": {"vr": "LO", "Value": ["X"]}}, transaction)
    assert not_allowed.status_code == 400 and "PatientID (0010,0020) is not allowed" in not_allowed.json()
    unfinished = change_state(http, uid, "COMPLETED", transaction)
    assert unfinished.status_code == 400 and "UnifiedProcedureStepPerformedProcedureSequence" in unfinished.json()

    sequence_replaced = {"00404025": {"vr": "SQ", "Value": [code("MR_9", "Station name")]}}
    assert update(http, uid, {**PERFORMED, **sequence_replaced}, transaction).status_code == 200
    stored = retrieve(http, uid)
    assert [i["00080100"]["Value"][0] for i in stored["00404025"]["Value"]] == ["MR_9"]  # sequences replaced whole
    assert value(stored, "00100020") == "P1" and value(stored, "00741204") == "New label"  # the rest kept

    assert change_state(http, uid, "COMPLETED", transaction).status_code == 200
    again = change_state(http, uid, "COMPLETED", transaction)
    assert again.status_code == 200
    assert (
        again.headers["warning"].startswith("299 ")
        and "already in the final state 'COMPLETED'. B306." in (again.headers["warning"])
    )
    final = update(http, uid, label, transaction)
    assert final.status_code == 400 and "C306" in final.json()
    assert search(http, "PatientID=P1&ProcedureStepState=COMPLETED&limit=200").status_code == 200


def _in_state(http: httpx.Client, state: str, owner: str) -> str:
    uid = new_workitem(http)
    if state == "SCHEDULED":
        return uid
    assert change_state(http, uid, "IN PROGRESS", owner).status_code == 200
    if state in ("COMPLETED", "CANCELED"):
        assert update(http, uid, PERFORMED if state == "COMPLETED" else CANCEL_PROGRESS, owner).status_code == 200
        assert change_state(http, uid, state, owner).status_code == 200
    return uid


# spec 5.8's table: (current, target) -> outcome with the owner's transaction UID, with another one
TRANSITIONS = {
    ("SCHEDULED", "IN PROGRESS"): ("IN PROGRESS", "IN PROGRESS"),
    ("SCHEDULED", "COMPLETED"): ("C310", "C310"),
    ("SCHEDULED", "CANCELED"): ("C310", "C310"),
    ("IN PROGRESS", "IN PROGRESS"): ("C302", "C301"),
    ("IN PROGRESS", "COMPLETED"): ("COMPLETED", "C301"),
    ("IN PROGRESS", "CANCELED"): ("CANCELED", "C301"),
    ("COMPLETED", "IN PROGRESS"): ("C300", "C301"),
    ("COMPLETED", "COMPLETED"): ("B306", "C301"),
    ("COMPLETED", "CANCELED"): ("C300", "C301"),
    ("CANCELED", "IN PROGRESS"): ("C300", "C301"),
    ("CANCELED", "COMPLETED"): ("C300", "C301"),
    ("CANCELED", "CANCELED"): ("B304", "C301"),
}


def test_the_whole_transition_table(http):
    for (current, target), outcomes in TRANSITIONS.items():
        for owner_matches, expected in zip((True, False), outcomes, strict=True):
            owner = new_uid()
            uid = _in_state(http, current, owner)
            if target == "COMPLETED" and current == "IN PROGRESS":
                assert update(http, uid, PERFORMED, owner).status_code == 200
            if target == "CANCELED" and current == "IN PROGRESS":
                assert update(http, uid, CANCEL_PROGRESS, owner).status_code == 200
            response = change_state(http, uid, target, owner if owner_matches else new_uid())
            case = (current, target, owner_matches, response.status_code, response.text, response.headers)
            if re.fullmatch("C[0-9]{3}", expected):
                assert response.status_code == 400, case
                assert response.json() == f"The workitem instance can not transition to '{target}' state: {expected}."
            elif re.fullmatch("B[0-9]{3}", expected):
                assert response.status_code == 200 and f"{expected}." in response.headers["warning"], case
            else:
                assert response.status_code == 200 and "warning" not in response.headers, case
                assert value(retrieve(http, uid), "00741000") == expected
    bad = change_state(http, new_workitem(http), "SCHEDULED", "1.2.3")
    assert bad.status_code == 400 and "to be one of the following values" in bad.json()
    missing = http.put(f"{BASE}/workitems/{new_uid()}/state", content="[{}]", headers=SEND)
    assert missing.status_code == 400 and "TransactionUID (0008,1195) is required but missing" in missing.json()


def test_cancel_request(http):
    uid = new_workitem(http)
    reason = {
        "00741238": {"vr": "LT", "Value": ["This Workitem should be cancelled."]},
        "0074100A": {"vr": "UR", "Value": ["https://example.org"]},
        "0074100C": {"vr": "LO", "Value": ["Requestor"]},
        "0074100E": {"vr": "SQ", "Value": [code("110514", "Incorrect worklist entry selected")]},
    }
    canceled = cancel(http, uid, reason)
    assert canceled.status_code == 202 and canceled.json() == "The workitem instance has been cancelled."
    stored = retrieve(http, uid)
    assert value(stored, "00741000") == "CANCELED"
    progress = stored["00741002"]["Value"][0]
    assert value(progress, "00741238") == "This Workitem should be cancelled." and "00404052" in progress
    assert value(progress["00741008"]["Value"][0], "0074100A") == "https://example.org"
    twice = cancel(http, uid, reason)
    assert twice.status_code == 409 and twice.json() == "The UPS is already in the requested state of CANCELED."
    assert twice.headers["warning"].endswith(': "The UPS is already in the requested state of CANCELED."')
    assert update(http, uid, {"00741204": {"vr": "LO", "Value": ["x"]}}).status_code == 409  # C304

    owner = new_uid()
    completed = _in_state(http, "COMPLETED", owner)
    assert cancel(http, completed).status_code == 400 and "C311" in cancel(http, completed).json()
    in_progress = _in_state(http, "IN PROGRESS", owner)
    unheard = cancel(http, in_progress)
    assert unheard.status_code == 400 and "C312" in unheard.json()  # nobody subscribed could act on it
    not_allowed = cancel(http, in_progress, {"00100020": {"vr": "LO", "Value": ["X"]}})
    assert not_allowed.status_code == 400 and "PatientID (0010,0020) is not allowed" in not_allowed.json()


# -- search -----------------------------------------------------------------------------------------------------------
def test_search_matching(http):
    tag = new_uid().replace(".", "")[-10:]
    first = new_workitem(http, patient_id=f"S{tag}A", name=f"Müller{tag}^Anna", station=f"ST{tag}", accession=f"A{tag}")
    second = new_workitem(
        http, patient_id=f"S{tag}B", name=f"Smith{tag}^Bob", station=f"OT{tag}", start="20220101080000"
    )
    both = {first, second}
    cases = {
        f"PatientID=S{tag}A": [first],
        f"PatientID=s{tag}*": [first, second],  # case-insensitive, wildcard
        f"PatientName=MULLER{tag}^ANNA": [first],  # accents and case folded
        f"PatientName=anna&fuzzymatching=true&PatientID=S{tag}*": [first],
        f"PatientName=smi&fuzzymatching=true&PatientID=S{tag}*": [second],
        f"00100010=Smith{tag}^Bob": [second],
        f"ReferencedRequestSequence.AccessionNumber=A{tag}": [first],
        f"0040A370.00401001=RP-A{tag}": [first],
        f"ScheduledStationNameCodeSequence.CodeValue=st{tag}": [first],
        f"00404025.00080100=OTHER_1&PatientID=S{tag}*": [first, second],  # any item matches
        f"ScheduledStationClassCodeSequence.CodeValue=CLASS&PatientID=S{tag}*": [first, second],
        f"ScheduledStationGeographicLocationCodeSequence.CodeValue=LOC&PatientID=S{tag}*": [first, second],
        f"ScheduledProcedureStepStartDateTime=20220101-&PatientID=S{tag}*": [second],
        f"ScheduledProcedureStepStartDateTime=20211201-20211203&PatientID=S{tag}*": [first],
        f"ProcedureStepState=scheduled&PatientID=S{tag}*": [first, second],
        f"ProcedureStepState=COMPLETED&PatientID=S{tag}*": [],
        f"StudyInstanceUID=1.2.3.4.5&PatientID=S{tag}*": [first, second],
        f"PatientID=S{tag}C": [],
    }
    for query, expected in cases.items():
        response = search(http, query)
        assert sorted(uids_of(response)) == sorted(expected), (query, response.status_code, response.text)
        assert set(expected) <= both
    row = search(http, f"PatientID=S{tag}A").json()[0]
    assert "00081195" not in row and value(row, "00741000") == "SCHEDULED" and "0040A370" in row
    assert "0040E020" not in row  # not a return key
    assert value(search(http, f"PatientID=S{tag}A&includefield=0040E020").json()[0], "0040E020") == "Type of Instances"
    assert "0040E020" in search(http, f"PatientID=S{tag}A&includefield=all").json()[0]


def test_search_refusals(http):
    refused = {
        "Modality=CT": "Invalid workitem query. AttributeId 'Modality' is not queryable.",
        "ReferencedRequestSequence.IssuerOfAccessionNumberSequence.LocalNamespaceEntityID=x": "is not queryable",
        "limit=500": "The query parameter 'Limit' is invalid. The field Limit must be between 1 and 200.",
        "limit=0": "between 1 and 200",
        "offset=-1": "The field Offset must be 0 or greater.",
        "PatientID=": "has empty string value",
        "ScheduledProcedureStepStartDateTime=2021-12": "is invalid",
        "fuzzymatching=maybe": "'true' or 'false'",
        "includefield=NoSuchKeyword": "is unknown",
    }
    for query, message in refused.items():
        response = search(http, query)
        assert response.status_code == 400 and message in response.json(), (query, response.text)
    assert search(http, "PatientID=NOBODY-EVER").status_code == 204
    assert http.get(f"{BASE}/workitems", headers={"Accept": "application/dicom"}).status_code == 406


def test_paging_holds_whole_rows_while_workitems_change(http):
    prefix = "PG" + new_uid().replace(".", "")[-8:]
    created = [new_workitem(http, patient_id=f"{prefix}{n:02d}") for n in range(12)]
    owner = new_uid()

    def churn() -> None:
        for uid in created[::2]:
            assert change_state(http, uid, "IN PROGRESS", owner).status_code == 200
            update(http, uid, {"00741204": {"vr": "LO", "Value": ["changed " * 8]}}, owner)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(churn)
        pages = [search(http, f"PatientID={prefix}*&limit=5&offset={offset}") for offset in (0, 5, 10)]
        running.result()
    seen = [uid for page in pages for uid in uids_of(page)]
    assert seen == created  # creation order: changes do not move rows between pages
    for page in pages:
        for row in page.json():
            assert {"00080018", "00741000", "00741204", "0040A370"} <= set(row)


# -- concurrency ------------------------------------------------------------------------------------------------------
PARALLEL = 8


def test_parallel_claims_have_exactly_one_winner(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        uid = new_workitem(http)
    transactions = [new_uid() for _ in range(PARALLEL)]

    def claim(transaction: str) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as client:  # a connection each: truly parallel requests
            return change_state(client, uid, "IN PROGRESS", transaction)

    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(claim, transactions))
    winners = [t for t, a in zip(transactions, answers, strict=True) if a.status_code == 200]
    assert len(winners) == 1, [(a.status_code, a.text) for a in answers]
    for answer in answers:
        assert answer.status_code == 200 or (answer.status_code, answer.json()[-5:]) in ((400, "C301."), (409, "etry."))
    with httpx.Client(base_url=server.url, timeout=60) as http:  # the winner owns it
        assert update(http, uid, {"00741204": {"vr": "LO", "Value": ["mine"]}}, winners[0]).status_code == 200


def test_parallel_updates_lose_no_write(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        uid = new_workitem(http)
    # each writer sets an attribute of its own: every 200 must be visible at the end
    changes = [{"00400400": {"vr": "LT", "Value": [f"comment {n}"]}} for n in range(PARALLEL // 2)] + [
        {f"0011{n:02X}10": {"vr": "LO", "Value": [f"private {n}"]}} for n in range(PARALLEL // 2)
    ]

    def write(change: dict) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return update(client, uid, change)

    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = list(pool.map(write, changes))
    assert {a.status_code for a in answers} <= {200, 409}, [a.text for a in answers]
    assert any(a.status_code == 200 for a in answers)
    for answer in answers:
        if answer.status_code == 409:
            assert "changed by another request" in answer.json()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        stored = retrieve(http, uid)
    for change, answer in zip(changes, answers, strict=True):
        key, element = next(iter(change.items()))
        if answer.status_code == 200 and key != "00400400":
            assert stored[key] == element, (key, stored.get(key))
    comments = [c for c, a in zip(changes[: PARALLEL // 2], answers, strict=False) if a.status_code == 200]
    if comments:  # the same attribute: the last successful write wins, and it is one of them
        assert stored["00400400"] in [c["00400400"] for c in comments]


# -- partitions -------------------------------------------------------------------------------------------------------
def test_workitems_live_in_their_partition(partitioned_server):
    partition = "wl" + new_uid().replace(".", "")[-10:]
    base = f"/v2/partitions/{partition}"
    with httpx.Client(base_url=partitioned_server.url, timeout=60) as http:
        uid = new_uid()
        created = create(http, uid, base=base)  # the partition is created on the way, as STOW does
        assert created.status_code == 201
        assert created.headers["location"] == f"{partitioned_server.url}{base}/workitems/{uid}"
        assert http.get(f"{base}/workitems/{uid}", headers={"Accept": DICOM_JSON}).status_code == 200
        other = http.get(f"/v2/partitions/{partition}x/workitems/{uid}", headers={"Accept": DICOM_JSON})
        assert other.status_code == 400 and other.json() == "Specified PartitionName does not exist."
        elsewhere = http.get(f"/v2/partitions/Microsoft.Default/workitems/{uid}", headers={"Accept": DICOM_JSON})
        assert elsewhere.status_code == 404
        assert http.get(f"/v2/workitems/{uid}", headers={"Accept": DICOM_JSON}).status_code == 400
        found = http.get(f"{base}/workitems?PatientID=P1", headers={"Accept": DICOM_JSON})
        assert uids_of(found) == [uid]
