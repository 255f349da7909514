"""STOW-RS: ``POST /studies[/{study}]`` (multipart/related or single-part application/dicom)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from dicomhub.api.context import RequestContext, check_uid, studies_context
from dicomhub.api.media import (
    DICOM,
    MemoryBudget,
    MultipartSpooler,
    SpooledPart,
    accepts_dicom_json,
    stow_boundary,
)
from dicomhub.api.openapi import STORE_DOC
from dicomhub.api.responses import json_response
from dicomhub.auth.audit import record_stored_instances
from dicomhub.domain.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from dicomhub.domain.store import StoreResult

router = APIRouter(tags=["STOW-RS"])

MULTIPLE_VALUES_WARNING = (
    '299 {host}: "One or more indexed Dicom tag(s) have multiple values, only first value is indexed."'
)


@router.post("/studies", summary="Store instances", **STORE_DOC)
async def store(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _store(request, ctx, None)


@router.post("/studies/{study}", summary="Store instances of one study", **STORE_DOC)
async def store_in_study(study: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    if study.strip():
        check_uid(study, "StudyInstanceUID")
    return await _store(request, ctx, study.rstrip(" \0") or None)


async def _store(request: Request, ctx: RequestContext, study: str | None) -> Response:
    if not accepts_dicom_json(request.headers.get("accept")):
        return Response(status_code=406)
    blobs = ctx.services.blobs
    boundary = stow_boundary(request.headers.get("content-type"))
    try:
        parts = await (_spool_single(request, ctx) if boundary is None else _spool_multipart(request, ctx, boundary))
    except ClientDisconnect:
        # nobody is left to answer; a 400 keeps it out of the unexpected-error log (spooled parts are already gone)
        raise InvalidRequest("The client closed the connection before the request body was complete.") from None
    try:
        related = "application/dicom"
        for part in parts:
            if (part.content_type or related).strip().lower() != DICOM:
                raise UnsupportedMediaType(f"The content type '{part.content_type}' of a part is not supported.")
    except UnsupportedMediaType:
        for part in parts:
            blobs.discard(part.staged)
        raise
    if not parts:
        return Response(status_code=204)

    def store_all() -> list[StoreResult]:
        partition = ctx.partition_for_store()
        return ctx.services.store.store_many(partition, [p.staged for p in parts], ctx.api_version, study)

    results = await run_in_threadpool(store_all)
    record_stored_instances(request, results)
    status, dataset = stow_response(results, ctx.base_url(), study, ctx.api_version)
    headers = {}
    if any(r.multiple_values_indexed for r in results if r.stored):
        headers["Warning"] = MULTIPLE_VALUES_WARNING.format(host=request.url.hostname)
    return json_response(request, dataset, status_code=status, headers=headers)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


async def _spool_single(request: Request, ctx: RequestContext) -> list[SpooledPart]:
    limit = ctx.services.settings.max_file_size
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)  # no need to read a body that cannot be accepted
    part = SpooledPart(DICOM, MemoryBudget(ctx.services.blobs.new_staging_file), limit)
    try:
        async for chunk in request.stream():
            part.write(chunk)
    except PayloadTooLarge:
        ctx.services.blobs.discard(part.staged)
        raise _too_large(limit) from None
    except BaseException:
        ctx.services.blobs.discard(part.staged)
        raise
    finally:
        part.close()
    return [part]


async def _spool_multipart(request: Request, ctx: RequestContext, boundary: str) -> list[SpooledPart]:
    services = ctx.services
    spooler = MultipartSpooler(boundary, services.blobs.new_staging_file, services.settings.max_file_size)
    try:
        return await spooler.consume(request.stream())
    except BaseException:
        for part in spooler.parts:
            services.blobs.discard(part.staged)
        raise


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _comments(result: StoreResult) -> dict[str, Any]:
    items = [{"00000902": {"vr": "LO", "Value": [c]}} for c in result.comments]
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def stow_response(
    results: list[StoreResult], base_url: str, study: str | None, api_version: int
) -> tuple[int, dict[str, Any]]:
    """The PS3.18 store response dataset and Azure's status code rules."""
    stored = [r for r in results if r.stored]
    failed = [r for r in results if not r.stored]
    dataset: dict[str, Any] = {}
    if study and stored:
        dataset["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{study}"]}
    if failed:
        items = []
        for r in failed:
            item = {
                "00081150": _ui(r.sop_class_uid),
                "00081155": _ui(r.sop_uid),
                "00081197": {"vr": "US", "Value": [r.failure]},
            }
            if r.comments:
                item["00741048"] = _comments(r)
            items.append(item)
        dataset["00081198"] = {"vr": "SQ", "Value": items}
    if stored:
        items = []
        for r in stored:
            url = f"{base_url}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
            item: dict[str, Any] = {
                "00081150": _ui(r.sop_class_uid),
                "00081155": _ui(r.sop_uid),
                "00081190": {"vr": "UR", "Value": [url]},
            }
            if r.warning is not None:
                item["00081196"] = {"vr": "US", "Value": [r.warning]}
            if api_version >= 2:
                item["00741048"] = _comments(r)
            items.append(item)
        dataset["00081199"] = {"vr": "SQ", "Value": items}
    if not stored:
        return 409, dataset
    if failed or (api_version >= 2 and any(r.warning is not None for r in stored)):
        return 202, dataset
    return 200, dataset
