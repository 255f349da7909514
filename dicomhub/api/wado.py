"""WADO-RS: study/series/instance retrieve, metadata (with ETag) and frames."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from dicomhub.api.context import RequestContext, check_uid, studies_context
from dicomhub.api.media import (
    DICOM,
    MULTIPART_RELATED,
    OCTET_STREAM,
    accepts_dicom_json,
    multipart_body,
    multipart_content_type,
    new_boundary,
    parse_accept,
)
from dicomhub.api.responses import json_response
from dicomhub.domain.errors import InvalidRequest, NotAcceptable
from dicomhub.domain.retrieve import ORIGINAL, Part, parse_frame_numbers

router = APIRouter(tags=["WADO-RS"])

INSTANCE_SYNTAXES = {ORIGINAL, ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEG2000Lossless}
FRAME_SYNTAXES = {ORIGINAL, ExplicitVRLittleEndian}
FRAME_MEDIA = {OCTET_STREAM: FRAME_SYNTAXES, "image/jp2": {JPEG2000Lossless}}
SINGLE_FRAME_ONLY = "The accept header is supported for single frame retrieval, use multi-part accept header instead."


def negotiate_instances(accept: str | None, single_allowed: bool) -> tuple[bool, str]:
    """(multipart?, transfer syntax) for a DICOM retrieve, best Accept range first."""
    for media in parse_accept(accept):
        if media.type in ("*/*", "multipart/*") and not media.transfer_syntax:
            return True, ORIGINAL
        if media.type == MULTIPART_RELATED and media.related_type in (None, DICOM):
            syntax = media.transfer_syntax or ExplicitVRLittleEndian
            if syntax in INSTANCE_SYNTAXES:
                return True, syntax
        elif media.type == DICOM and single_allowed:
            syntax = media.transfer_syntax or ExplicitVRLittleEndian
            if syntax in INSTANCE_SYNTAXES:
                return False, syntax
    raise NotAcceptable()


def negotiate_frames(accept: str | None) -> tuple[bool, str, str]:
    """(multipart?, part media type, transfer syntax) for a frames retrieve."""
    for media in parse_accept(accept):
        if media.type in ("*/*", "multipart/*") and not media.transfer_syntax:
            return True, OCTET_STREAM, ORIGINAL
        if media.type == MULTIPART_RELATED:
            part_type = media.related_type or OCTET_STREAM
            syntaxes = FRAME_MEDIA.get(part_type)
            if syntaxes is not None:
                syntax = media.transfer_syntax or next(iter(sorted(syntaxes - {ORIGINAL})))
                if syntax in syntaxes:
                    return True, part_type, syntax
        elif media.type == OCTET_STREAM:
            syntax = media.transfer_syntax or ExplicitVRLittleEndian
            if syntax in FRAME_SYNTAXES:
                return False, OCTET_STREAM, syntax
    raise NotAcceptable()


async def _retrieve(request: Request, ctx: RequestContext, study: str, series: str | None, sop: str | None) -> Response:
    study = check_uid(study, "StudyInstanceUID")
    series = check_uid(series, "SeriesInstanceUID") if series is not None else None
    sop = check_uid(sop, "SOPInstanceUID") if sop is not None else None
    multipart, syntax = negotiate_instances(request.headers.get("accept"), single_allowed=sop is not None)
    retrieve = ctx.services.retrieve
    partition = await run_in_threadpool(ctx.partition)
    found = await run_in_threadpool(retrieve.instances, partition, study, series, sop)
    retrieve.check_transfer_syntax(found, syntax)
    if not multipart:
        part: Part = await run_in_threadpool(retrieve.file, found[0], syntax)
        headers = (
            {"Content-Length": str(found[0].file_size)} if part.transfer_syntax == found[0].transfer_syntax_uid else {}
        )
        return StreamingResponse(
            part.chunks, media_type=f"{DICOM}; transfer-syntax={part.transfer_syntax}", headers=headers
        )

    boundary = new_boundary()

    def parts():
        for inst in found:
            part = retrieve.file(inst, syntax)
            yield f"{DICOM}; transfer-syntax={part.transfer_syntax}", part.chunks

    return StreamingResponse(multipart_body(parts(), boundary), media_type=multipart_content_type(DICOM, boundary))


@router.get("/studies/{study}", summary="Retrieve a study")
async def retrieve_study(study: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _retrieve(request, ctx, study, None, None)


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series")
async def retrieve_series(
    study: str, series: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _retrieve(request, ctx, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
async def retrieve_instance(
    study: str, series: str, instance: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _retrieve(request, ctx, study, series, instance)


async def _metadata(request: Request, ctx: RequestContext, study: str, series: str | None, sop: str | None) -> Response:
    study = check_uid(study, "StudyInstanceUID")
    series = check_uid(series, "SeriesInstanceUID") if series is not None else None
    sop = check_uid(sop, "SOPInstanceUID") if sop is not None else None
    if not accepts_dicom_json(request.headers.get("accept")):
        return Response(status_code=406)
    retrieve = ctx.services.retrieve
    partition = await run_in_threadpool(ctx.partition)
    etag = await run_in_threadpool(retrieve.metadata_etag, partition, study, series, sop)
    if request.headers.get("if-none-match", "").strip().strip('"').lower() == etag.lower():
        return Response(status_code=304)
    body = await run_in_threadpool(retrieve.metadata, partition, study, series, sop)
    return json_response(request, body, headers={"ETag": etag})


@router.get("/studies/{study}/metadata", summary="Metadata of a study")
async def study_metadata(study: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _metadata(request, ctx, study, None, None)


@router.get("/studies/{study}/series/{series}/metadata", summary="Metadata of a series")
async def series_metadata(
    study: str, series: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _metadata(request, ctx, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata", summary="Metadata of an instance")
async def instance_metadata(
    study: str, series: str, instance: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _metadata(request, ctx, study, series, instance)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", summary="Retrieve frames")
async def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    ctx: RequestContext = Depends(studies_context),
) -> Response:
    study = check_uid(study, "StudyInstanceUID")
    series = check_uid(series, "SeriesInstanceUID")
    instance = check_uid(instance, "SOPInstanceUID")
    numbers = parse_frame_numbers(frames)
    multipart, media_type, syntax = negotiate_frames(request.headers.get("accept"))
    if not multipart and len(numbers) > 1:
        raise InvalidRequest(SINGLE_FRAME_ONLY)
    retrieve = ctx.services.retrieve
    partition = await run_in_threadpool(ctx.partition)
    found = await run_in_threadpool(retrieve.instances, partition, study, series, instance)
    parts = await run_in_threadpool(retrieve.frames, found[0], numbers, syntax)
    if not multipart:
        return StreamingResponse(
            parts[0].chunks, media_type=f"{media_type}; transfer-syntax={parts[0].transfer_syntax}"
        )
    boundary = new_boundary()
    body = multipart_body(((f"{media_type}; transfer-syntax={p.transfer_syntax}", p.chunks) for p in parts), boundary)
    return StreamingResponse(body, media_type=multipart_content_type(media_type, boundary))
