"""Bulk data: metadata with BulkDataURI (opt-in), the values the URIs name (bytes equal to pydicom's, Range), pixel
data per CP-2040 (native and encapsulated), errors, partitions and the server-wide default."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import start_server
from tests.factory import make_dataset, multipart, new_uid
from tests.servers import Server
from tests.test_wado import (
    BIG,
    IMPLICIT,
    Stored,
    get_without_accept,
    parse_multipart,
    pydicom_file,
    reuid,
    split_media_type,
    store,
    stored,
)

JSON = {"Accept": "application/dicom+json"}
URI_JSON = {"Accept": "application/dicom+json; bulkdata=uri"}
OCTET = {"Accept": "application/octet-stream"}
MULTI_OCTET = {"Accept": 'multipart/related; type="application/octet-stream"'}
THRESHOLD = 1024  # DICOMHUB_BULKDATA_URI_THRESHOLD's default
PRIVATE_CREATOR = "DICOMHUB BULK"
LONG_COMMENT = "bulk " * 300  # 1500 bytes of LT: over the threshold
DEFLATED = "1.2.840.10008.1.2.1.99"


def rich_dataset(study: str, series: str, transfer_syntax: str = str(ExplicitVRLittleEndian)) -> Dataset:
    """Two native frames, a large and a small private OB, an icon image (pixel data in a sequence item), an OW
    overlay and a long LT comment."""
    ds = make_dataset(study, series, rows=32, columns=32, frames=2, transfer_syntax=transfer_syntax)
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "OB", bytes(range(256)) * 8)  # 2048 bytes
    block.add_new(0x02, "OB", b"tiny-ob!")
    block.add_new(0x03, "LO", "private text")
    icon = Dataset()
    icon.Rows, icon.Columns, icon.SamplesPerPixel, icon.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = (np.arange(64 * 64) % 251).astype(np.uint8).tobytes()
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x60000010, "US", 128)
    ds.add_new(0x60000011, "US", 128)
    ds.add_new(0x60003000, "OW", np.arange(128 * 128 // 16, dtype=np.uint16).tobytes())  # 2048 bytes
    ds.ImageComments = LONG_COMMENT
    return ds


@dataclass
class BulkFixture:
    study: str
    rich: Stored
    implicit: Stored
    big_endian: Stored
    rle: Stored
    no_pixels: Stored

    @property
    def all(self) -> list[Stored]:
        return [self.rich, self.implicit, self.big_endian, self.rle, self.no_pixels]


@pytest.fixture(scope="module")
def data(server: Server) -> BulkFixture:
    study, series, other = new_uid(), new_uid(), new_uid()
    implicit = rich_dataset(study, series, IMPLICIT)
    fixture = BulkFixture(
        study,
        stored(rich_dataset(study, series)),
        stored(implicit),
        reuid(pydicom_file("MR_small_bigendian.dcm"), study, other),
        reuid(pydicom_file("SC_rgb_rle_2frame.dcm"), study, other),
        stored(make_dataset(study, other, PixelData=None)),
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        store(client, *fixture.all)
    return fixture


# -- helpers ---------------------------------------------------------------------------------------------------------
def metadata(http: httpx.Client, inst: Stored, version: str = "v2", **kwargs) -> dict[str, Any]:
    response = http.get(f"{inst.path(version)}/metadata", **kwargs)
    assert response.status_code == 200, response.text
    (document,) = response.json()
    return document


def bulk_elements(document: dict[str, Any], prefix: tuple = ()) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """(path, element) of every element with a BulkDataURI or InlineBinary, nested items included."""
    for key, element in document.items():
        path = (*prefix, int(key, 16))
        if "BulkDataURI" in element or "InlineBinary" in element:
            yield path, element
        for index, item in enumerate(element.get("Value", []) if element.get("vr") == "SQ" else []):
            yield from bulk_elements(item, (*path, index))


def raw_value(ds: Dataset, path: tuple) -> bytes:
    """The element's value bytes as pydicom reads them from the original file (encoded text for text VRs)."""
    node = ds
    for i in range(0, len(path) - 1, 2):
        node = node[path[i]].value[path[i + 1]]
    raw = node.get_item(path[-1])
    return raw.value if isinstance(raw.value, bytes) else node[path[-1]].value


def absolute(server: Server, path: str) -> str:
    return f"{server.url}{path}"


# -- metadata --------------------------------------------------------------------------------------------------------
def test_default_metadata_leaves_bulk_values_out(http, data, version):
    for inst in data.all:
        document = metadata(http, inst, version, headers=JSON)
        assert list(bulk_elements(document)) == []
        assert "7FE00010" not in document
    rich = metadata(http, data.rich, version, headers=JSON)
    assert "00111001" not in rich and "60003000" not in rich
    assert "7FE00010" not in rich["00880200"]["Value"][0]
    assert rich["00204000"] == {"vr": "LT", "Value": [LONG_COMMENT.rstrip()]}


@pytest.mark.parametrize("ask", ["accept", "query"])
def test_opt_in_metadata_has_bulkdata_uris(server, http, data, version, ask):
    kwargs = {"headers": URI_JSON} if ask == "accept" else {"headers": JSON, "params": {"bulkdata": "uri"}}
    document = metadata(http, data.rich, version, **kwargs)
    url = absolute(server, data.rich.path(version))
    assert document["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{url}/pixeldata"}
    assert document["00111001"] == {"vr": "OB", "BulkDataURI": f"{url}/bulkdata/00111001"}
    assert document["00111002"] == {"vr": "OB", "InlineBinary": base64.b64encode(b"tiny-ob!").decode()}
    assert document["60003000"] == {"vr": "OW", "BulkDataURI": f"{url}/bulkdata/60003000"}
    assert document["00204000"] == {"vr": "LT", "BulkDataURI": f"{url}/bulkdata/00204000"}
    icon = document["00880200"]["Value"][0]
    assert icon["7FE00010"] == {"vr": "OB", "BulkDataURI": f"{url}/bulkdata/00880200/0/7FE00010"}
    assert icon["00280010"] == {"vr": "US", "Value": [64]}
    assert list(document) == sorted(document) and list(icon) == sorted(icon)
    # everything else is the default metadata, unchanged
    default = metadata(http, data.rich, version, headers=JSON)
    for key, element in default.items():
        if key not in ("00204000", "00880200"):
            assert document[key] == element, key
    assert set(document) - set(default) == {"00111001", "00111002", "60003000", "7FE00010"}


def test_opt_in_metadata_etag_is_its_own(http, data):
    default = http.get(f"{data.rich.path()}/metadata", headers=JSON)
    rich = http.get(f"{data.rich.path()}/metadata", headers=URI_JSON)
    assert rich.headers["etag"] == default.headers["etag"] + "-bulkdata"
    again = http.get(f"{data.rich.path()}/metadata", headers={**URI_JSON, "If-None-Match": rich.headers["etag"]})
    assert again.status_code == 304
    mixed = http.get(f"{data.rich.path()}/metadata", headers={**URI_JSON, "If-None-Match": default.headers["etag"]})
    assert mixed.status_code == 200


def test_study_metadata_with_bulkdata(server, http, data):
    response = http.get(f"/v2/studies/{data.study}/metadata", params={"bulkdata": "uri"}, headers=JSON)
    assert response.status_code == 200, response.text
    documents = {d["00080018"]["Value"][0]: d for d in response.json()}
    assert set(documents) == {i.sop for i in data.all}
    assert "7FE00010" not in documents[data.no_pixels.sop]
    for inst in (data.rich, data.implicit, data.big_endian, data.rle):
        assert documents[inst.sop]["7FE00010"]["BulkDataURI"] == absolute(server, inst.path()) + "/pixeldata"
    assert documents[data.rle.sop]["7FE00010"]["vr"] == "OB"
    assert documents[data.implicit.sop]["00111001"]["vr"] == "UN"  # an unknown private tag in implicit VR
    assert documents[data.implicit.sop]["60003000"]["vr"] == "OW"


def test_invalid_bulkdata_mode(http, data):
    response = http.get(f"{data.rich.path()}/metadata", params={"bulkdata": "inline"}, headers=JSON)
    assert response.status_code == 400
    assert (
        response.text
        == "The bulkdata value 'inline' is invalid: use 'uri' (bulk values as BulkDataURI) or 'omit' (left out)."
    )


# -- values ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["rich", "implicit", "big_endian", "rle"])
def test_every_bulkdata_uri_resolves_to_the_element_bytes(http, data, which):
    inst: Stored = getattr(data, which)
    document = metadata(http, inst, headers=URI_JSON)
    found = [(path, element) for path, element in bulk_elements(document) if "BulkDataURI" in element]
    assert found
    for path, element in found:
        uri = element["BulkDataURI"]
        if uri.endswith("/pixeldata"):
            continue  # see the pixel data tests
        response = http.get(uri, headers=OCTET)
        assert response.status_code == 200, (uri, response.text)
        assert response.content == raw_value(inst.ds, path), uri
        media, params = split_media_type(response.headers["content-type"])
        assert (media, params["transfer-syntax"]) == ("application/octet-stream", inst.transfer_syntax)
        assert response.headers["content-location"] == uri
    for path, element in bulk_elements(document):
        if "InlineBinary" in element:
            assert base64.b64decode(element["InlineBinary"]) == raw_value(inst.ds, path)


@pytest.mark.parametrize("which", ["rich", "implicit", "big_endian", "rle"])
def test_top_level_pixel_data_as_a_bulkdata_path(http, data, which):
    """The element value as stored: native bytes, or the encapsulated items (offset table and fragments)."""
    inst: Stored = getattr(data, which)
    response = http.get(f"{inst.path()}/bulkdata/7FE00010", headers=OCTET)
    assert response.status_code == 200
    assert response.content == inst.ds.PixelData
    tail = http.get(f"{inst.path()}/bulkdata/7fe00010", headers={**OCTET, "Range": "bytes=-100"})
    assert (tail.status_code, tail.content) == (206, inst.ds.PixelData[-100:])


def test_bulkdata_multipart_is_the_default(http, data):
    uri = f"{data.rich.path()}/bulkdata/00111001"
    expected = bytes(range(256)) * 8
    for headers in (
        MULTI_OCTET,
        {"Accept": "*/*"},
        {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    ):
        response = http.get(uri, headers=headers)
        assert response.status_code == 200, response.text
        (part,) = parse_multipart(response)
        assert part.data == expected
        assert split_media_type(part.content_type)[1]["transfer-syntax"] == data.rich.transfer_syntax
    response = get_without_accept(http, uri)
    assert response.status_code == 200
    assert [p.data for p in parse_multipart(response)] == [expected]


def test_dicomweb_client_retrieves_bulkdata(server, http, data):
    client = DICOMwebClient(url=f"{server.url}/v2")
    document = client.retrieve_instance_metadata(data.rich.study, data.rich.series, data.rich.sop)
    assert "00111001" not in document  # the client asks for the default representation
    rich = metadata(http, data.rich, headers=URI_JSON)
    expected = bytes(range(256)) * 8
    assert client.retrieve_bulkdata(rich["00111001"]["BulkDataURI"]) == [expected]
    assert client.retrieve_bulkdata(rich["00111001"]["BulkDataURI"], byte_range=(100, 199)) == [expected[100:200]]
    pixels = client.retrieve_bulkdata(rich["7FE00010"]["BulkDataURI"])
    assert pixels == [data.rich.ds.PixelData]


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=10-19", 10, 20),
        ("bytes=2000-", 2000, 2048),
        ("bytes=-7", 2041, 2048),
        ("bytes=2040-9999", 2040, 2048),
        ("bytes=-5000", 0, 2048),
        ("bytes=0-0", 0, 1),
    ],
)
def test_range_returns_exactly_the_slice(http, data, header, start, end):
    expected = (bytes(range(256)) * 8)[start:end]
    uri = f"{data.rich.path()}/bulkdata/00111001"
    response = http.get(uri, headers={**OCTET, "Range": header})
    assert response.status_code == 206
    assert response.content == expected
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/2048"
    assert response.headers["content-length"] == str(end - start)
    multi = http.get(uri, headers={**MULTI_OCTET, "Range": header})
    assert multi.status_code == 206
    assert [p.data for p in parse_multipart(multi)] == [expected]


@pytest.mark.parametrize("header", ["bytes=2048-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range(http, data, header):
    response = http.get(f"{data.rich.path()}/bulkdata/00111001", headers={**OCTET, "Range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */2048"
    assert response.text == f"The range '{header}' is outside the value's 2048 bytes."


@pytest.mark.parametrize("header", ["bytes=20-10", "items=0-5", "bytes=0-1,5-6", "bytes=abc"])
def test_invalid_or_multiple_ranges_are_ignored(http, data, header):
    response = http.get(f"{data.rich.path()}/bulkdata/00111001", headers={**OCTET, "Range": header})
    assert response.status_code == 200
    assert response.content == bytes(range(256)) * 8
    assert "content-range" not in response.headers


def test_big_endian_values_are_served_as_stored(http, data):
    response = http.get(f"{data.big_endian.path()}/pixeldata", headers=OCTET)
    assert response.status_code == 200
    assert response.content == data.big_endian.ds.PixelData  # pydicom keeps the stored (big endian) bytes
    assert split_media_type(response.headers["content-type"])[1]["transfer-syntax"] == BIG
    asked = http.get(
        f"{data.big_endian.path()}/pixeldata",
        headers={"Accept": f"{OCTET['Accept']}; transfer-syntax=1.2.840.10008.1.2.1"},
    )
    assert asked.status_code == 406
    assert "1.2.840.10008.1.2.2" in asked.text


# -- pixel data ------------------------------------------------------------------------------------------------------
def test_native_pixeldata_single_and_multipart(server, http, data):
    url = f"{data.rich.path()}/pixeldata"
    single = http.get(url, headers=OCTET)
    assert single.status_code == 200
    assert single.content == data.rich.ds.PixelData
    assert single.headers["accept-ranges"] == "bytes"
    multi = http.get(url, headers=MULTI_OCTET)
    (part,) = parse_multipart(multi)
    assert part.data == data.rich.ds.PixelData
    frame = 32 * 32 * 2
    second = http.get(url, headers={**OCTET, "Range": f"bytes={frame}-"})
    assert second.status_code == 206
    assert second.content == data.rich.ds.PixelData[frame:]
    implicit = http.get(
        f"{data.implicit.path()}/pixeldata",
        headers={"Accept": "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"},
    )
    assert implicit.status_code == 200  # implicit VR little endian values are the explicit VR little endian bytes
    assert implicit.content == data.implicit.ds.PixelData


def test_encapsulated_pixeldata_one_part_per_frame(server, http, data):
    response = http.get(f"{data.rle.path()}/pixeldata", headers=MULTI_OCTET)
    assert response.status_code == 200, response.text
    parts = parse_multipart(response)
    expected = list(generate_frames(data.rle.ds.PixelData, number_of_frames=2))
    assert [p.data for p in parts] == expected
    for part in parts:
        assert split_media_type(part.content_type)[1]["transfer-syntax"] == data.rle.transfer_syntax
    raw = response.content.decode("latin-1")
    url = absolute(server, data.rle.path())
    assert f"Content-Location: {url}/frames/1\r\n" in raw and f"Content-Location: {url}/frames/2\r\n" in raw
    ranged = http.get(f"{data.rle.path()}/pixeldata", headers={**MULTI_OCTET, "Range": "bytes=0-9"})
    assert ranged.status_code == 200  # a range over several values is ignored
    assert [p.data for p in parse_multipart(ranged)] == expected
    single = http.get(f"{data.rle.path()}/pixeldata", headers=OCTET)
    assert single.status_code == 406
    assert "several values: multipart only" in single.text


def test_series_pixeldata(http, data):
    response = http.get(f"/v2/studies/{data.study}/series/{data.rle.series}/pixeldata", headers=MULTI_OCTET)
    assert response.status_code == 200, response.text
    datas = [p.data for p in parse_multipart(response)]
    expected = [data.big_endian.ds.PixelData, *generate_frames(data.rle.ds.PixelData, number_of_frames=2)]
    assert sorted(datas) == sorted(expected)  # the instance without pixel data is left out


def test_scope_pixeldata_errors(http, data):
    single = http.get(f"/v2/studies/{data.study}/series/{data.rich.series}/pixeldata", headers=OCTET)
    assert single.status_code == 406  # a series is several values, even of one instance
    assert "several values: multipart only" in single.text
    lone = make_dataset(PixelData=None)
    store(http, stored(lone))
    response = http.get(f"/v2/studies/{lone.StudyInstanceUID}/pixeldata", headers=MULTI_OCTET)
    assert (response.status_code, response.text) == (404, "The specified scope has no pixel data.")


def test_dicomweb_client_pixeldata_of_encapsulated(server, data):
    client = DICOMwebClient(url=f"{server.url}/v2")
    url = f"{server.url}{data.rle.path()}/pixeldata"
    assert client.retrieve_bulkdata(url) == list(generate_frames(data.rle.ds.PixelData, number_of_frames=2))


# -- errors ----------------------------------------------------------------------------------------------------------
def test_unknown_instance(http, data):
    response = http.get(f"/v2/studies/{data.study}/series/{data.rich.series}/instances/{new_uid()}/bulkdata/00111001")
    assert (response.status_code, response.text) == (404, "The specified instance cannot be found.")
    response = http.get(f"/v2/studies/{data.study}/series/{data.rich.series}/instances/{new_uid()}/pixeldata")
    assert (response.status_code, response.text) == (404, "The specified instance cannot be found.")
    response = http.get(f"/v2/studies/{new_uid()}/pixeldata")
    assert (response.status_code, response.text) == (404, "The specified study cannot be found.")


@pytest.mark.parametrize("path", ["00111009", "00880200/1/7FE00010", "00100010", "00880200", "00880200/0/00280010"])
def test_missing_or_non_bulk_element(http, data, path):
    """No such element or item; a name or sequence; a short US value (inline in the metadata, never a URI)."""
    response = http.get(f"{data.rich.path()}/bulkdata/{path}")
    assert response.status_code == 404
    assert response.text.startswith(f"The instance has no bulk data element at '{path.upper()}'")


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("zz", "'zz' is not a tag of 8 hexadecimal digits."),
        ("00880200/x/7FE00010", "'x' is not a 0-based item number."),
        ("00880200/0", "it must be a tag, or tag/item/tag... ending with a tag"),
    ],
)
def test_invalid_bulkdata_path(http, data, path, problem):
    response = http.get(f"{data.rich.path()}/bulkdata/{path}")
    assert response.status_code == 400
    assert response.text.startswith(f"The bulk data path '{path}' is invalid: ")
    assert problem in response.text


def test_instance_without_pixel_data(http, data):
    response = http.get(f"{data.no_pixels.path()}/pixeldata")
    assert (response.status_code, response.text) == (404, "The specified instance has no pixel data.")


def test_deflated_file(http, server):
    inst = reuid(pydicom_file("image_dfl.dcm"))
    store(http, inst)
    document = metadata(http, inst, headers=URI_JSON)
    response = http.get(document["7FE00010"]["BulkDataURI"], headers=OCTET)
    assert response.status_code == 200
    assert response.content == inst.ds.PixelData
    assert split_media_type(response.headers["content-type"])[1]["transfer-syntax"] == str(ExplicitVRLittleEndian)


# -- partitions and the server default ------------------------------------------------------------------------------
def test_partitioned_bulkdata(partitioned_server):
    name = f"bulk-{new_uid()[-8:]}"
    ds = rich_dataset(new_uid(), new_uid())
    inst = stored(ds)
    content_type, body = multipart([inst.data])
    with httpx.Client(base_url=partitioned_server.url, timeout=60) as client:
        base = f"/v2/partitions/{name}"
        response = client.post(f"{base}/studies", content=body, headers={"Content-Type": content_type, **JSON})
        assert response.status_code == 200, response.text
        path = f"{base}/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}"
        (document,) = client.get(f"{path}/metadata", headers=URI_JSON).json()
        uri = document["60003000"]["BulkDataURI"]
        assert uri == f"{partitioned_server.url}{path}/bulkdata/60003000"
        assert client.get(uri, headers=OCTET).content == raw_value(inst.ds, (0x60003000,))
        assert (
            client.get(
                f"/v2/partitions/other-{name}/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}/bulkdata/60003000"
            ).status_code
            == 400
        )


@pytest.fixture(scope="module")
def uri_default_server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory, "sqlite", metadata_bulkdata="true", bulkdata_uri_threshold="4")
    yield srv
    srv.stop()


def test_server_default_and_threshold(uri_default_server):
    inst = stored(rich_dataset(new_uid(), new_uid()))
    with httpx.Client(base_url=uri_default_server.url, timeout=60) as client:
        store(client, inst)
        document = metadata(client, inst, headers=JSON)
        url = f"{uri_default_server.url}{inst.path()}"
        assert document["00111002"] == {"vr": "OB", "BulkDataURI": f"{url}/bulkdata/00111002"}  # 8 bytes > 4
        assert document["00111003"] == {"vr": "LO", "Value": ["private text"]}  # LO is never bulk data
        assert document["00204000"] == {"vr": "LT", "BulkDataURI": f"{url}/bulkdata/00204000"}
        assert client.get(f"{url}/bulkdata/00204000", headers=OCTET).content == LONG_COMMENT.encode()
        assert document["00280010"] == {"vr": "US", "Value": [32]}  # 2 bytes: inline
        omitted = metadata(client, inst, headers={"Accept": "application/dicom+json; bulkdata=omit"})
        assert list(bulk_elements(omitted)) == [] and "00111001" not in omitted
