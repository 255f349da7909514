"""The OpenAPI description of the routes: what each reads from the path, query and headers, its bodies, its answers.

Handlers read their inputs from the request themselves, so that bad input gets Azure's messages (spec 5.14) rather
than FastAPI's validation errors; FastAPI therefore sees none of them. Routes are registered with ``**<name>_doc``
(``openapi_extra``, ``responses``): that describes a route and validates nothing. :func:`install` then declares
every path parameter by its name and drops the 422 answers FastAPI assumes (the error handlers answer 400).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from dicomhub.api.context import VERSIONS
from dicomhub.api.media import DICOM, DICOM_JSON, MULTIPART_RELATED, OCTET_STREAM
from dicomhub.dicom.render import DOCUMENTS, GIF, JPEG, PNG, VIDEO
from dicomhub.dicom.tags import tag_key
from dicomhub.domain.attributes import CORE_ATTRIBUTES
from dicomhub.domain.bulk_update import MAX_STUDIES
from dicomhub.domain.changefeed import LIMITS
from dicomhub.domain.extended_tags import SUPPORTED_VRS
from dicomhub.domain.operations import OperationStatus, OperationType
from dicomhub.domain.query import DEFAULT_LIMIT, MAX_LIMIT, RESOURCES

Json = dict[str, Any]
STRING: Json = {"type": "string"}
UID: Json = {"type": "string", "pattern": r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$", "maxLength": 64}


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _parameter(location: str, name: str, description: str, schema: Json, **extra: Any) -> Json:
    return {"name": name, "in": location, "description": description, "schema": schema, **extra}


# -- path parameters: declared by name on every route whose path has them (see install) ------------------------------
PATH_PARAMETERS: dict[str, Json] = {
    name: _parameter("path", name, description, schema, required=True)
    for name, description, schema in (
        (
            "version",
            "API version: 2 is current; 1 and 1.0-prerelease keep Azure's version 1 behaviour.",
            {"type": "string", "enum": list(VERSIONS)},
        ),
        ("study", "Study Instance UID.", UID),
        ("series", "Series Instance UID.", UID),
        ("instance", "SOP Instance UID.", UID),
        (
            "frames",
            "Frame numbers, 1-based, comma separated.",
            {"type": "string", "pattern": r"^[1-9][0-9]*(,[1-9][0-9]*)*$"},
        ),
        (
            "path",
            "Bulk data path as metadata's BulkDataURI gives it: a tag (8 hexadecimal digits) or, inside sequences, "
            "tag/item/tag... with 0-based item numbers (00880200/0/7FE00010).",
            {"type": "string", "pattern": r"^[0-9A-Fa-f]{8}(/[0-9]+/[0-9A-Fa-f]{8})*$"},
        ),
        (
            "tag_path",
            "Extended query tag: 8 hexadecimal digits or an attribute keyword.",
            {"type": "string", "pattern": r"^([0-9A-Fa-f]{8}|[A-Za-z][A-Za-z0-9]*)$"},
        ),
        (
            "operation_id",
            "Operation id: a GUID, as 32 hexadecimal digits (the form answers use) or with dashes.",
            {"type": "string", "pattern": r"^[0-9A-Fa-f]{32}$"},
        ),
        ("workitem", "Workitem (UPS) SOP Instance UID; the global subscription UIDs on the subscriber routes.", UID),
        (
            "aet",
            "AE title of the subscriber: 1 to 16 printable ASCII characters, no backslash.",
            {"type": "string", "pattern": r"^[ -\[\]-~]{1,16}$"},
        ),
        (
            "partition_name",
            "Data partition (DICOMHUB_ENABLE_PARTITIONS). STOW creates it; other routes need it to exist.",
            {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
        ),
    )
}


def query(name: str, description: str, schema: Json = STRING, **extra: Any) -> Json:
    return _parameter("query", name, description, schema, **extra)


def header(name: str, description: str, schema: Json = STRING) -> Json:
    return _parameter("header", name, description, schema)


def accepting(*media_types: str) -> list[Json]:
    """The Accept header and PS3.18's ``accept`` query parameter (which overrides the header), with examples."""
    examples = {"type": "string", "examples": list(media_types)}
    listed = ", ".join(media_types)
    return [
        header("Accept", f"Media types the client accepts (q-values honoured), e.g. {listed}.", examples),
        query(
            "accept",
            "Media types as in the Accept header, for clients that cannot set headers (PS3.18 8.3.3.1); when given, "
            "the Accept header is ignored.",
            examples,
        ),
    ]


IF_NONE_MATCH = header("If-None-Match", "An ETag of an earlier answer: 304 (no body) when it still matches.")
ORIGINAL_VERSION = header(
    "msdicom-request-original",
    "true: the version first stored, before any bulk update (Azure's header).",
    {"type": "string", "enum": ["true", "false"]},
)
RANGE = header(
    "Range",
    "One byte range (bytes=a-b, bytes=a- or bytes=-n) of a single value: 206 with Content-Range; 416 when outside "
    "the value. Malformed or multiple ranges are ignored (the whole value).",
    {"type": "string", "pattern": r"^bytes=[0-9]*-[0-9]*$"},
)


def paging(default: int, maximum: int, offset_description: str = "Entries to skip.") -> list[Json]:
    return [
        query(
            "limit",
            f"Most entries to return (default {default}).",
            {"type": "integer", "minimum": 1, "maximum": maximum},
        ),
        query("offset", offset_description, {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
    ]


# -- answers -----------------------------------------------------------------------------------------------------------
TEXT = {"text/plain": {"schema": STRING}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
ERRORS = {
    400: "Invalid request (path, query, header or body); the plain-text message says what is wrong.",
    404: "Unknown API version or route, or the resource does not exist.",
    406: "No acceptable representation (Accept, transfer syntax, transcoding or rendering limits); the message "
    "says why.",
    409: "Conflict: nothing could be stored, or the resource or an operation of the same kind exists already.",
    413: "The request body (or a part of it) is over the size limit.",
    415: "The request's Content-Type is not one this route takes.",
    416: "The Range lies outside the value (Content-Range: bytes */length).",
}


def errors(*codes: int) -> dict[int, Json]:
    return {code: {"description": ERRORS[code], "content": TEXT} for code in codes}


# Routes filtered on Accept as Azure's AcceptContentFilter does: a 406 without a body when it does not allow DICOM JSON
NOT_ACCEPTABLE_EMPTY = {
    406: {"description": "The Accept header (or accept parameter) does not allow DICOM JSON: no body."}
}
NOT_MODIFIED = {304: {"description": "If-None-Match holds the current ETag: no body."}}
ETAG = {"ETag": {"description": "Version of the answer, for If-None-Match.", "schema": STRING}}
LOCATION = {"Location": {"description": "URL of the operation.", "schema": STRING}}


def answer(description: str, content: Json | None = None, headers: Json | None = None) -> Json:
    described: Json = {"description": description}
    if content:
        described["content"] = content
    if headers:
        described["headers"] = headers
    return described


def json_answer(description: str, schema: Json, media_type: str = "application/json", **extra: Any) -> Json:
    return answer(description, {media_type: {"schema": schema}}, **extra)


def route_doc(responses: dict[int, Json], parameters: Iterable[Json] = (), body: Json | None = None) -> Json:
    """Keyword arguments of a route registration that describe it. The route's status code is its first success
    (FastAPI's default answer; the handlers return responses, so it changes nothing at run time)."""
    extra: Json = {}
    if parameters:
        extra["parameters"] = list(parameters)
    if body is not None:
        extra["requestBody"] = body
    success = min(code for code in responses if code < 300)
    return {"status_code": success, "response_class": Response, "responses": responses, "openapi_extra": extra}


# -- component schemas -------------------------------------------------------------------------------------------------
SCHEMAS: dict[str, Json] = {
    "DicomElement": {
        "type": "object",
        "description": "One attribute in the DICOM JSON model (PS3.18 F.2).",
        "required": ["vr"],
        "properties": {
            "vr": {"type": "string", "pattern": "^[A-Z]{2}$"},
            "Value": {"type": "array"},
            "InlineBinary": {"type": "string", "contentEncoding": "base64"},
            "BulkDataURI": {"type": "string"},
        },
    },
    "DicomDataset": {
        "type": "object",
        "description": "A dataset in the DICOM JSON model: attributes keyed by tag (8 upper-case hexadecimal digits).",
        "propertyNames": {"pattern": "^[0-9A-Fa-f]{8}$"},
        "additionalProperties": ref("DicomElement"),
    },
    "DicomDatasets": {"type": "array", "items": ref("DicomDataset")},
    "OperationReference": {
        "type": "object",
        "required": ["id", "href"],
        "properties": {"id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "href": {"type": "string"}},
    },
    "Operation": {
        "type": "object",
        "required": ["operationId", "type", "createdTime", "lastUpdatedTime", "status", "percentComplete"],
        "properties": {
            "operationId": {"type": "string"},
            "type": {"type": "string", "enum": [t.value for t in OperationType]},
            "createdTime": {"type": "string", "format": "date-time"},
            "lastUpdatedTime": {"type": "string", "format": "date-time"},
            "status": {"type": "string", "enum": [s.value for s in OperationStatus] + ["completed"]},
            "percentComplete": {"type": "integer", "minimum": 0, "maximum": 100},
            "resources": {"type": "array", "items": STRING},
            "results": {"description": "Outcome of a finished bulk update (study and instance counts, errors)."},
        },
    },
    "NewExtendedQueryTag": {
        "type": "object",
        "description": "A tag to index (property names and level are case-insensitive; spec 5.4).",
        "required": ["Path", "Level"],
        "properties": {
            "Path": {"type": "string", "description": "8 hexadecimal digits or a keyword"},
            "VR": {"type": "string", "enum": sorted(SUPPORTED_VRS), "description": "required for private tags"},
            "PrivateCreator": {"type": "string", "description": "private tags only"},
            "Level": {"type": "string", "enum": ["Study", "Series", "Instance"]},
        },
    },
    "QueryStatusUpdate": {
        "type": "object",
        "required": ["QueryStatus"],
        "additionalProperties": False,
        "properties": {"QueryStatus": {"type": "string", "enum": ["Enabled", "Disabled"]}},
    },
    "ExtendedQueryTag": {
        "type": "object",
        "required": ["path", "vr", "level", "status", "queryStatus"],
        "properties": {
            "path": STRING,
            "vr": STRING,
            "privateCreator": STRING,
            "level": {"type": "string", "enum": ["study", "series", "instance"]},
            "status": {"type": "string", "enum": ["adding", "ready", "deleting"]},
            "queryStatus": {"type": "string", "enum": ["enabled", "disabled"]},
            "errors": {"type": "object", "properties": {"count": {"type": "integer"}, "href": STRING}},
            "operation": ref("OperationReference"),
        },
    },
    "ExtendedQueryTagError": {
        "type": "object",
        "properties": {
            "studyInstanceUid": STRING,
            "seriesInstanceUid": STRING,
            "sopInstanceUid": STRING,
            "createdTime": {"type": "string", "format": "date-time"},
            "errorMessage": STRING,
            "partitionName": STRING,
        },
    },
    "Location": {
        "type": "object",
        "description": "An Azure blob container (blobContainerUri, or connectionString + blobContainerName), an S3 "
        "bucket (the server's AWS_* credentials) or a folder under DICOMHUB_EXPORT_ROOTS; prefix: a folder in it.",
        "required": ["type", "settings"],
        "properties": {
            "type": {"type": "string", "enum": ["azureblob", "s3", "filesystem"]},
            "settings": {
                "type": "object",
                "properties": {
                    "blobContainerUri": STRING,
                    "connectionString": STRING,
                    "blobContainerName": STRING,
                    "bucket": STRING,
                    "path": STRING,
                    "prefix": STRING,
                },
            },
        },
    },
    "ExportRequest": {
        "type": "object",
        "description": "Spec 5.6: identifiers 'study', 'study/series' or 'study/series/instance'; files written to "
        "<operation>/results/<study>/<series>/<sop>.dcm, errors to <operation>/errors.log.",
        "required": ["source", "destination"],
        "properties": {
            "source": {
                "type": "object",
                "required": ["type", "settings"],
                "properties": {
                    "type": {"type": "string", "enum": ["identifiers"]},
                    "settings": {
                        "type": "object",
                        "required": ["values"],
                        "properties": {"values": {"type": "array", "items": STRING, "minItems": 1}},
                    },
                },
            },
            "destination": ref("Location"),
            "deidentify": {
                "type": "object",
                "description": "PS3.15 Basic Application Level Confidentiality Profile on the way out.",
                "properties": {"profile": {"type": "string", "enum": ["basic"]}},
            },
        },
    },
    "ImportRequest": {
        "type": "object",
        "required": ["source"],
        "properties": {"source": ref("Location")},
    },
    "BulkUpdateRequest": {
        "type": "object",
        "description": "Studies and the patient/study attributes to set in them (spec 5.2; names case-insensitive).",
        "required": ["studyInstanceUids", "changeDataset"],
        "properties": {
            "studyInstanceUids": {"type": "array", "items": UID, "minItems": 1, "maxItems": MAX_STUDIES},
            "changeDataset": ref("DicomDataset"),
        },
    },
    "ChangeFeedEntry": {
        "type": "object",
        "required": ["sequence", "partitionName", "action", "timestamp", "state"],
        "properties": {
            "sequence": {"type": "integer"},
            "partitionName": STRING,
            "studyInstanceUid": STRING,
            "seriesInstanceUid": STRING,
            "sopInstanceUid": STRING,
            "action": {"type": "string", "enum": ["Create", "Delete", "Update"]},
            "timestamp": {"type": "string", "format": "date-time"},
            "state": {"type": "string", "enum": ["Current", "Replaced", "Deleted"]},
            "metadata": ref("DicomDataset"),
        },
    },
    "Partition": {
        "type": "object",
        "required": ["partitionKey", "partitionName", "createdDate"],
        "properties": {
            "partitionKey": {"type": "integer"},
            "partitionName": STRING,
            "createdDate": {"type": "string", "format": "date-time"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["overallStatus", "details"],
        "properties": {
            "overallStatus": {"type": "string", "enum": ["Healthy", "Unhealthy"]},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": STRING,
                        "status": {"type": "string", "enum": ["Healthy", "Unhealthy"]},
                        "description": STRING,
                    },
                },
            },
        },
    },
}


# -- the routes --------------------------------------------------------------------------------------------------------
def _multipart(part_type: str) -> str:
    return f'{MULTIPART_RELATED}; type="{part_type}"'


DICOM_JSON_ANSWER = {DICOM_JSON: {"schema": ref("DicomDatasets")}}
STORE_RESPONSE = {DICOM_JSON: {"schema": ref("DicomDataset")}}

STORE_DOC = route_doc(
    {
        200: answer("Every instance stored (PS3.18 store response).", STORE_RESPONSE),
        202: answer("Some instances stored, others failed, or (v2) stored with warnings.", STORE_RESPONSE),
        204: answer("The multipart body had no part."),
        409: answer("No instance stored: the failure reasons are in the response dataset.", STORE_RESPONSE),
        **errors(400, 404, 413, 415),
        **NOT_ACCEPTABLE_EMPTY,
    },
    accepting(DICOM_JSON, "application/json", "*/*"),
    body={
        "required": True,
        "description": "DICOM files: a multipart/related body of application/dicom parts (with its boundary "
        "parameter), or one file as application/dicom.",
        "content": {_multipart(DICOM): BINARY, DICOM: BINARY},
    },
)


def _search_parameters(resource: str) -> list[Json]:
    _, levels, _ = RESOURCES[resource]
    filters = []
    for attribute in CORE_ATTRIBUTES:
        if attribute.level not in levels:
            continue
        matching = {
            "DA": "a date (YYYYMMDD) or a range (a-b, a-, -b)",
            "PN": "a name; * and ? wildcards; word prefixes with fuzzymatching=true",
            "UI": "a UID or a comma-separated list of UIDs",
        }.get(attribute.vr, "a value; * and ? wildcards")
        for name in (attribute.keyword, tag_key(attribute.tag)):
            filters.append(query(name, f"{attribute.keyword} ({attribute.vr}): {matching}.", STRING))
    return [
        *filters,
        query(
            "includefield",
            "Attributes (keywords or tags, comma separated, or repeated) to return beyond the default set; all: "
            "every stored attribute and the computed ones.",
            {"type": "array", "items": STRING},
            style="form",
            explode=True,
        ),
        *paging(DEFAULT_LIMIT, MAX_LIMIT),
        query("fuzzymatching", "Person names match by word prefixes, ignoring case and accents.", {"type": "boolean"}),
        *accepting(DICOM_JSON, "application/json", "*/*"),
    ]


SEARCH_NOTE = (
    " Besides the listed keys, any ready extended query tag (by keyword or tag) is a filter; an attribute not "
    "searchable at this level is a 400."
)


def search_doc(resource: str) -> Json:
    """The QIDO-RS description of one search resource (its searchable attributes differ by level)."""
    return route_doc(
        {
            200: answer("Matches, in the DICOM JSON model.", DICOM_JSON_ANSWER),
            204: answer("No match."),
            **errors(400, 404),
            **NOT_ACCEPTABLE_EMPTY,
        },
        _search_parameters(resource),
    ) | {"description": "QIDO-RS search." + SEARCH_NOTE}


def _retrieve_content(*media_types: str) -> Json:
    return {media_type: BINARY for media_type in media_types}


RETRIEVE_DOC = route_doc(
    {
        200: answer(
            "The instances: multipart/related of application/dicom parts, or (one instance, Accept application/dicom) "
            "a single file. Each part's transfer-syntax parameter names its syntax.",
            _retrieve_content(_multipart(DICOM), DICOM),
        ),
        **errors(400, 404, 406),
    },
    [
        *accepting(
            f"{_multipart(DICOM)}; transfer-syntax=*",
            _multipart(DICOM),
            f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.1",
            "*/*",
        ),
        ORIGINAL_VERSION,
    ],
)
METADATA_DOC = route_doc(
    {
        200: answer("Metadata of every instance, in the DICOM JSON model.", DICOM_JSON_ANSWER, ETAG),
        **NOT_MODIFIED,
        **errors(400, 404),
        **NOT_ACCEPTABLE_EMPTY,
    },
    [
        query(
            "bulkdata",
            "uri: bulk values as BulkDataURI (InlineBinary when short); omit: left out (Azure's form). Default: "
            "DICOMHUB_METADATA_BULKDATA.",
            {"type": "string", "enum": ["uri", "omit"]},
        ),
        *accepting(DICOM_JSON, f"{DICOM_JSON}; bulkdata=uri", "application/json", "*/*"),
        IF_NONE_MATCH,
        ORIGINAL_VERSION,
    ],
)


def frames_doc(frame_media_types: Iterable[str]) -> Json:
    """Frames are answered in any of ``frame_media_types``, single part (one frame) or multipart."""
    single = list(frame_media_types)
    return route_doc(
        {
            200: answer(
                "The frames: multipart/related with one part per frame, or one frame single part.",
                _retrieve_content(*[_multipart(t) for t in single], *single),
            ),
            **errors(400, 404, 406),
        },
        accepting(f"{_multipart(OCTET_STREAM)}; transfer-syntax=*", *[_multipart(t) for t in single], *single, "*/*"),
    )


def _bulk_values_doc(values: str) -> Json:
    single = f"{OCTET_STREAM}; transfer-syntax=*"
    content = _retrieve_content(_multipart(OCTET_STREAM), OCTET_STREAM)
    headers = {"Accept-Ranges": {"schema": STRING}, "Content-Location": {"schema": STRING}}
    return route_doc(
        {
            200: answer(values, content, headers),
            206: answer("The requested byte range of a single value.", content, {"Content-Range": {"schema": STRING}}),
            **errors(400, 404, 406, 416),
        },
        [*accepting(_multipart(OCTET_STREAM), single, "*/*"), RANGE],
    )


BULKDATA_DOC = _bulk_values_doc("The value as stored (multipart/related, or single part when asked).")
PIXELDATA_DOC = _bulk_values_doc(
    "Pixel data as stored: native pixel data as one value, encapsulated pixel data one part per frame (multipart)."
)
RENDER_QUERY = [
    query("quality", "JPEG quality (default 100).", {"type": "integer", "minimum": 1, "maximum": 100}),
    query(
        "window",
        "center,width[,function]: the VOI window; function linear (default), linear-exact or sigmoid.",
        {"type": "string", "pattern": r"^-?[0-9.]+,[0-9.]+(,(linear|linear-exact|sigmoid))?$"},
    ),
    query(
        "viewport",
        "vw,vh[,sx,sy,sw,sh]: fit the image (or the source region sx,sy,sw,sh) into vw x vh pixels.",
        {"type": "string", "pattern": r"^[0-9]+,[0-9]+(,-?[0-9]+,-?[0-9]+,-?[0-9]+,-?[0-9]+)?$"},
    ),
]


def _render_doc(images: tuple[str, ...], description: str) -> Json:
    documents = sorted(set(DOCUMENTS.values()) | set(VIDEO.values()))
    return route_doc(
        {
            200: answer(description, _retrieve_content(*images, *documents), {**ETAG}),
            **NOT_MODIFIED,
            **errors(400, 404, 406),
        },
        [*RENDER_QUERY, *accepting(*images, "image/*", "*/*"), IF_NONE_MATCH],
    )


RENDERED_DOC = _render_doc(
    (JPEG, PNG, GIF),
    "The image (JPEG when Accept allows any; GIF: every frame of an instance); an encapsulated document or video "
    "instance as its stored bytes.",
)
THUMBNAIL_DOC = _render_doc((JPEG, PNG), "A small image (DICOMHUB_THUMBNAIL_SIZE pixels square unless viewport says).")
DELETE_DOC = route_doc({204: answer("Deleted."), **errors(400, 404)})

BULK_UPDATE_DOC = route_doc(
    {
        202: json_answer("The update operation started.", ref("OperationReference"), headers=LOCATION),
        400: answer(
            "Invalid body: a plain-text message, or (attributes that cannot be updated or invalid values) a DICOM "
            "JSON dataset with a Failed Attributes Sequence.",
            {**TEXT, "application/json": {"schema": ref("DicomDataset")}},
        ),
        404: answer("Not on API version 1 (no body, as Azure), or an unknown version (plain-text message)."),
        **errors(409, 413, 415),
    },
    body={"required": True, "content": {"application/json": {"schema": ref("BulkUpdateRequest")}}},
)


def _operation_start_doc(started: str, schema: str) -> Json:
    return route_doc(
        {
            202: json_answer(started, ref("OperationReference"), headers=LOCATION),
            400: answer(
                "Invalid body, unknown type, a destination or source that cannot be reached (missing container or "
                "bucket, refused credentials), a folder outside DICOMHUB_EXPORT_ROOTS.",
                TEXT,
            ),
            **errors(404, 413, 415),
        },
        body={"required": True, "content": {"application/json": {"schema": ref(schema)}}},
    )


EXPORT_DOC = _operation_start_doc("The export operation started.", "ExportRequest")
IMPORT_DOC = _operation_start_doc("The import operation started.", "ImportRequest")
PARTITIONS_DOC = route_doc(
    {200: json_answer("The data partitions.", {"type": "array", "items": ref("Partition")}), **errors(400, 404)}
)
OPERATION_DOC = route_doc(
    {
        200: json_answer("The operation is done.", ref("Operation")),
        202: json_answer("The operation is still running.", ref("Operation"), headers=LOCATION),
        **errors(404),
    }
)
INCLUDE_METADATA = query(
    "includeMetadata", "Include the current DICOM JSON metadata (default true).", {"type": "boolean"}
)
CHANGE_FEED_DOC = route_doc(
    {
        200: json_answer("Entries (possibly none).", {"type": "array", "items": ref("ChangeFeedEntry")}),
        **errors(400, 404),
    },
    [
        *paging(
            LIMITS[2][0],
            LIMITS[2][1],
            "v1: the sequence after which entries start; v2: entries of the time window to skip.",
        ),
        query(
            "startTime",
            "v2: start of the time window (inclusive), with a time zone.",
            {"type": "string", "format": "date-time"},
        ),
        query(
            "endTime",
            "v2: end of the time window (exclusive), with a time zone.",
            {"type": "string", "format": "date-time"},
        ),
        INCLUDE_METADATA,
    ],
) | {
    "description": f"limit: v1 1-{LIMITS[1][1]} (default {LIMITS[1][0]}), v2 1-{LIMITS[2][1]} (default {LIMITS[2][0]})."
}
LATEST_CHANGE_DOC = route_doc(
    {
        200: json_answer("The newest entry.", ref("ChangeFeedEntry")),
        204: answer("The feed is empty."),
        **errors(400, 404),
    },
    [INCLUDE_METADATA],
)
TAG_LIST = {"type": "array", "items": ref("ExtendedQueryTag")}
ADD_TAGS_DOC = route_doc(
    {
        202: json_answer(
            "The tags are being added; their re-index operation.", ref("OperationReference"), headers=LOCATION
        ),
        409: answer("A tag exists already, or a re-index is running (Location: its operation).", TEXT, LOCATION),
        **errors(400, 404, 415),
    },
    body={
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "array", "minItems": 1, "items": ref("NewExtendedQueryTag")}}
        },
    },
)
LIST_TAGS_DOC = route_doc({200: json_answer("The tags.", TAG_LIST), **errors(400, 404)}, paging(100, 200))
GET_TAG_DOC = route_doc({200: json_answer("The tag.", ref("ExtendedQueryTag")), **errors(400, 404)})
UPDATE_TAG_DOC = route_doc(
    {200: json_answer("The updated tag.", ref("ExtendedQueryTag")), **errors(400, 404, 415)},
    body={"required": True, "content": {"application/json": {"schema": ref("QueryStatusUpdate")}}},
)
DELETE_TAG_DOC = route_doc({204: answer("Deleted, with its index data."), **errors(400, 404)})
TAG_ERRORS_DOC = route_doc(
    {
        200: json_answer("Indexing errors of the tag.", {"type": "array", "items": ref("ExtendedQueryTagError")}),
        **errors(400, 404),
    },
    paging(100, 200),
)
HEALTH_DOC = route_doc(
    {
        200: json_answer("Every dependency answers.", ref("Health")),
        503: json_answer("A dependency fails.", ref("Health")),
    }
)


# -- worklist (UPS-RS) -------------------------------------------------------------------------------------------------
WORKITEM_ERROR = {"application/json": {"schema": STRING}, **TEXT}
WORKITEM_ERRORS = {
    400: "Invalid request: the message names the attribute (missing, empty, not allowed, invalid) or the state rule "
    "(C301, C302, C306, C310, C311, C312...) that refused it.",
    404: "Unknown API version or route, or no such workitem.",
    409: "The workitem exists already, is CANCELED, or another request changed it meanwhile.",
    413: "The request body is over the size limit.",
    415: "The request's Content-Type is not application/dicom+json.",
}


def workitem_errors(*codes: int) -> dict[int, Json]:
    """Worklist failures answer a JSON string (spec 5.14); partition and version checks keep plain text."""
    return {code: {"description": WORKITEM_ERRORS[code], "content": WORKITEM_ERROR} for code in codes}


WORKITEM_BODY = {
    "required": True,
    "description": "A JSON array whose first element is the DICOM JSON dataset (spec 5.8).",
    "content": {DICOM_JSON: {"schema": ref("DicomDatasets")}, "application/json": {"schema": ref("DicomDatasets")}},
}
EMPTY = {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}  # Azure's bodiless successes
WORKITEM_LOCATION = {
    "Location": {"description": "URL of the workitem.", "schema": STRING},
    "Content-Location": {"description": "URL of the workitem.", "schema": STRING},
}
WARNING = {"Warning": {"description": '299 {host}: "{text}" (Azure\'s warning header).', "schema": STRING}}
CREATE_WORKITEM_DOC = route_doc(
    {
        201: answer("Created, SCHEDULED.", EMPTY, WORKITEM_LOCATION),
        **workitem_errors(400, 404, 409, 413, 415),
        **NOT_ACCEPTABLE_EMPTY,
    },
    accepting(DICOM_JSON, "application/json", "*/*"),
    body=WORKITEM_BODY,
) | {
    "description": "The workitem UID is the name of the first query parameter (/workitems?{uid}) or the dataset's "
    "SOPInstanceUID (both: they must match). The server sets SOPClassUID, ProcedureStepState, WorklistLabel and "
    "ScheduledProcedureStepModificationDateTime. The partition is created if needed."
}
RETRIEVE_WORKITEM_DOC = route_doc(
    {
        200: answer("The workitem (without its Transaction UID).", {DICOM_JSON: {"schema": ref("DicomDataset")}}),
        **workitem_errors(400, 404),
        **NOT_ACCEPTABLE_EMPTY,
    },
    accepting(DICOM_JSON, "application/json", "*/*"),
)
UPDATE_WORKITEM_DOC = route_doc(
    {
        200: answer("Updated.", EMPTY, {"Content-Location": WORKITEM_LOCATION["Content-Location"]}),
        **workitem_errors(400, 404, 409, 413, 415),
    },
    body=WORKITEM_BODY,
) | {
    "description": "Top-level attributes replace the stored ones (sequences whole). Once the workitem is IN "
    "PROGRESS, the owner's Transaction UID is the name of the first query parameter (/workitems/{uid}?{transaction})."
}
CHANGE_STATE_DOC = route_doc(
    {
        200: answer("The state changed, or (Warning: B304/B306) it was that final state already.", EMPTY, WARNING),
        **workitem_errors(400, 404, 409, 413, 415),
    },
    body=WORKITEM_BODY,
) | {"description": "Body: ProcedureStepState (IN PROGRESS, COMPLETED or CANCELED) and TransactionUID."}
CANCEL_WORKITEM_DOC = route_doc(
    {
        202: json_answer("Canceled (SCHEDULED), or the cancellation was requested from the subscribers.", STRING),
        409: answer("The workitem is CANCELED already (Warning header), or changed.", WORKITEM_ERROR, WARNING),
        **workitem_errors(400, 404, 413, 415),
    },
    body=WORKITEM_BODY,
)
_WORKITEM_KEYS = (
    ("PatientName", "a name; * and ? wildcards; word prefixes with fuzzymatching=true"),
    ("PatientID", "a value; * and ? wildcards"),
    ("ReferencedRequestSequence.AccessionNumber", "a value of any item; * and ? wildcards"),
    ("ReferencedRequestSequence.RequestedProcedureID", "a value of any item; * and ? wildcards"),
    ("ScheduledProcedureStepStartDateTime", "a date-time or a range (a-b, a-, -b)"),
    ("ScheduledStationNameCodeSequence.CodeValue", "a code value of any item"),
    ("ScheduledStationClassCodeSequence.CodeValue", "a code value of any item"),
    ("ScheduledStationGeographicLocationCodeSequence.CodeValue", "a code value of any item"),
    ("ProcedureStepState", "SCHEDULED, IN PROGRESS, COMPLETED or CANCELED"),
    ("StudyInstanceUID", "a UID or a comma-separated list of UIDs"),
)
SEARCH_WORKITEMS_DOC = route_doc(
    {
        200: answer("Matches, oldest first.", DICOM_JSON_ANSWER),
        204: answer("No match."),
        **workitem_errors(400, 404),
        **NOT_ACCEPTABLE_EMPTY,
    },
    [
        *(query(name, f"{name}: {matching}. Tags work too (0040A370.00080050).") for name, matching in _WORKITEM_KEYS),
        query(
            "includefield",
            "Top-level attributes (keywords or tags, comma separated, or repeated) to return beyond the return keys; "
            "all: every attribute.",
            {"type": "array", "items": STRING},
            style="form",
            explode=True,
        ),
        *paging(DEFAULT_LIMIT, MAX_LIMIT),
        query("fuzzymatching", "PatientName matches by word prefixes.", {"type": "boolean"}),
        *accepting(DICOM_JSON, "application/json", "*/*"),
    ],
) | {"description": "Any other attribute is a 400 (Azure's searchable keys, spec 5.8)."}
SUBSCRIBE_DOC = route_doc(
    {201: answer("Subscribed; an initial State Report is queued.", EMPTY), **workitem_errors(400, 404)},
    [
        query(
            "deletionlock",
            "Ask the server to keep the workitem until this subscriber unsubscribes.",
            {"type": "boolean"},
        ),
        query(
            "filter",
            "Filtered global subscription (1.2.840.10008.5.1.4.34.5.1) only: Key=value search keys (repeatable).",
            {"type": "array", "items": STRING},
            style="form",
            explode=True,
        ),
    ],
) | {
    "description": "A workitem UID subscribes to that workitem; 1.2.840.10008.5.1.4.34.5 to every workitem, now and "
    "later; 1.2.840.10008.5.1.4.34.5.1 to those matching the filter. Events arrive on the WebSocket "
    "/subscribers/{aet} of the same base URL."
}
UNSUBSCRIBE_DOC = route_doc(
    {200: answer("Unsubscribed (a global UID: from every workitem).", EMPTY), **workitem_errors(400, 404)}
)
SUSPEND_DOC = route_doc(
    {200: answer("No new automatic subscriptions; existing ones stay.", EMPTY), **workitem_errors(400, 404)}
)


# -- the document ------------------------------------------------------------------------------------------------------
_PATH_NAMES = re.compile(r"\{(\w+)\}")


BEARER = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "JWT",
    "description": "An OpenID Connect access token of DICOMHUB_AUTH_AUTHORITY for DICOMHUB_AUTH_AUDIENCE.",
}
REFUSALS = {
    401: answer("No valid bearer token (WWW-Authenticate says why).", TEXT),
    403: answer("The token's roles do not grant the route's data action.", TEXT),
    503: answer("The token could not be checked: the identity provider does not answer (Retry-After).", TEXT),
}


def _secure(document: Json, open_paths: frozenset[str]) -> None:
    """Every route outside ``open_paths`` takes a bearer token and may refuse with 401 or 403."""
    document["components"]["securitySchemes"] = {"bearer": BEARER}
    document["security"] = [{"bearer": []}]
    for path, item in document["paths"].items():
        for operation in item.values():
            if path in open_paths:
                operation["security"] = []
            else:
                operation["responses"].update({str(code): refusal for code, refusal in REFUSALS.items()})


def _complete(document: Json) -> None:
    """Path parameters declared by name (FastAPI's bare strings replaced), parameters listed once, no 422."""
    for path, item in document["paths"].items():
        declared = [PATH_PARAMETERS[name] for name in _PATH_NAMES.findall(path)]
        for operation in item.values():
            others = {
                (p["in"], p["name"]): p for p in operation.get("parameters", ()) if p["in"] != "path"
            }  # openapi_extra's come last: they win over anything FastAPI derived
            parameters = declared + list(others.values())
            if parameters:
                operation["parameters"] = parameters
            operation["responses"].pop("422", None)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(SCHEMAS)


def install(app: FastAPI, open_paths: frozenset[str] | None = None) -> None:
    """Serves the completed document at /openapi.json (built once, on first use); with ``open_paths`` (bearer
    authentication on), every other route declares the bearer token and its refusals."""

    def openapi() -> Json:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _complete(document)
            if open_paths is not None:
                _secure(document, open_paths)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
