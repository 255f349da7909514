"""``/v{n}/extendedquerytags``: add (starts a re-index operation), list, get, update the query status, delete, and
the indexing errors of a tag. Global: there is no partition variant of these routes."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response

from dicomhub.api.context import version_of
from dicomhub.api.json_body import read_json_body
from dicomhub.api.openapi import (
    ADD_TAGS_DOC,
    DELETE_TAG_DOC,
    GET_TAG_DOC,
    LIST_TAGS_DOC,
    TAG_ERRORS_DOC,
    UPDATE_TAG_DOC,
)
from dicomhub.api.operations import operation_reference, version_root
from dicomhub.api.responses import json_response
from dicomhub.domain.errors import InvalidRequest, UnsupportedMediaType
from dicomhub.domain.extended_tags import STATUS_NAMES, ExtendedTagService
from dicomhub.domain.operations import ActiveOperationConflict
from dicomhub.index.extended_tags import ExtendedTag, TagError
from dicomhub.index.schema import EXTENDED_ADDING

router = APIRouter(prefix="/v{version}/extendedquerytags", tags=["Extended query tags"])
_INTEGER = re.compile(r"[0-9]{1,18}")


def _service(request: Request) -> ExtendedTagService:
    version_of(request)  # unknown versions are 404
    return request.app.state.services.extended_tags


def _paging(request: Request) -> tuple[int, int]:
    """``limit`` 1..200 (default 100) and ``offset`` >= 0, with the query-model messages of Azure."""
    values = {k.lower(): v for k, v in request.query_params.items()}
    limit, offset = values.get("limit", "100"), values.get("offset", "0")
    if not _INTEGER.fullmatch(limit) or not 1 <= int(limit) <= 200:
        raise InvalidRequest("The query parameter 'limit' is invalid. The field Limit must be between 1 and 200.")
    if not _INTEGER.fullmatch(offset):
        raise InvalidRequest("The query parameter 'offset' is invalid. The field Offset must be 0 or greater.")
    return int(limit), int(offset)


async def _json_body(request: Request) -> Any:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"The content type '{content_type}' is not supported; use application/json.")
    return await read_json_body(request)


def tag_json(request: Request, tag: ExtendedTag) -> dict[str, Any]:
    root = version_root(request)
    body: dict[str, Any] = {"path": tag.path, "vr": tag.vr}
    if tag.private_creator is not None:
        body["privateCreator"] = tag.private_creator
    body.update(
        level=tag.level, status=STATUS_NAMES[tag.status], queryStatus="enabled" if tag.query_enabled else "disabled"
    )
    if tag.error_count:
        body["errors"] = {"count": tag.error_count, "href": f"{root}/extendedquerytags/{tag.path}/errors"}
    if tag.status == EXTENDED_ADDING and tag.operation_id is not None:
        body["operation"] = {"id": tag.operation_id, "href": f"{root}/operations/{tag.operation_id}"}
    return body


def _error_json(error: TagError) -> dict[str, Any]:
    return {
        "studyInstanceUid": error.study_uid,
        "seriesInstanceUid": error.series_uid,
        "sopInstanceUid": error.sop_uid,
        "createdTime": error.created_at.isoformat(),
        "errorMessage": error.message,
        "partitionName": error.partition_name,
    }


def _answer(request: Request, body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response(request, body, status_code=status_code, media_type="application/json", headers=headers)


@router.post("", summary="Add extended query tags and start their re-index", **ADD_TAGS_DOC)
async def add_tags(version: str, request: Request) -> Response:
    service = _service(request)
    body = await _json_body(request)
    try:
        operation = await run_in_threadpool(service.add, body)
    except ActiveOperationConflict as exc:
        location = operation_reference(request, exc.active)["href"]
        return PlainTextResponse(exc.message, status_code=409, headers={"Location": location})
    reference = operation_reference(request, operation)
    return _answer(request, reference, status_code=202, headers={"Location": reference["href"]})


@router.get("", summary="List extended query tags", **LIST_TAGS_DOC)
async def list_tags(version: str, request: Request) -> Response:
    service = _service(request)
    limit, offset = _paging(request)
    tags = await run_in_threadpool(service.list, limit, offset)
    return _answer(request, [tag_json(request, t) for t in tags])


@router.get("/{tag_path}", summary="Get an extended query tag", **GET_TAG_DOC)
async def get_tag(version: str, tag_path: str, request: Request) -> Response:
    tag = await run_in_threadpool(_service(request).get, tag_path)
    return _answer(request, tag_json(request, tag))


@router.patch("/{tag_path}", summary="Enable or disable QIDO on an extended query tag", **UPDATE_TAG_DOC)
async def update_tag(version: str, tag_path: str, request: Request) -> Response:
    service = _service(request)
    body = await _json_body(request)
    tag = await run_in_threadpool(service.set_query_status, tag_path, body)
    return _answer(request, tag_json(request, tag))


@router.delete("/{tag_path}", summary="Delete an extended query tag and its index data", **DELETE_TAG_DOC)
async def delete_tag(version: str, tag_path: str, request: Request) -> Response:
    await run_in_threadpool(_service(request).delete, tag_path)
    return Response(status_code=204)


@router.get("/{tag_path}/errors", summary="Indexing errors of an extended query tag", **TAG_ERRORS_DOC)
async def tag_errors(version: str, tag_path: str, request: Request) -> Response:
    service = _service(request)
    limit, offset = _paging(request)
    errors = await run_in_threadpool(service.errors, tag_path, limit, offset)
    return _answer(request, [_error_json(e) for e in errors])
