"""WADO-RS: study/series/instance retrieve, metadata (with ETag) and frames."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from fastapi import APIRouter, Request
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from dicomhub.api.context import RequestContext
from dicomhub.api.media import (
    DICOM,
    MULTIPART_RELATED,
    OCTET_STREAM,
    MediaRange,
    accepts_dicom_json,
    multipart_body,
    multipart_content_type,
    multipart_length,
    new_boundary,
    parse_accept,
    request_accept,
)
from dicomhub.api.openapi import METADATA_DOC, RETRIEVE_DOC, frames_doc
from dicomhub.api.responses import etag_matches, json_response
from dicomhub.api.scopes import Scope, add_scope_routes
from dicomhub.dicom.transcode import KNOWN
from dicomhub.domain.errors import InvalidRequest, NotAcceptable
from dicomhub.domain.retrieve import ORIGINAL, Part, parse_frame_numbers
from dicomhub.index.records import StoredInstance

router = APIRouter(tags=["WADO-RS"])

# Syntaxes a client may ask for; whether the stored one can be transcoded to it is the domain's answer (406 if not)
INSTANCE_SYNTAXES = {ORIGINAL} | KNOWN
# PS3.18 8.7.3.5: frame media types, their syntaxes and (first) default; defaults are lossless, lossy only on request
FRAME_MEDIA = {
    OCTET_STREAM: (ExplicitVRLittleEndian, ORIGINAL),
    "image/jp2": (JPEG2000Lossless, JPEG2000),
    "image/jphc": (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K),
    "image/jpeg": (JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit),
    "image/jls": (JPEGLSLossless, JPEGLSNearLossless),
    "image/dicom-rle": (RLELossless,),
}
ANY = ("*/*", "multipart/*")
T = TypeVar("T")
SINGLE_FRAME_ONLY = "The accept header is supported for single frame retrieval, use multi-part accept header instead."


def _any_multipart(media: MediaRange) -> bool:
    """``*/*``, or ``multipart/related; type="*/*"`` as dicomweb-client sends by default (Azure answers 406 to the
    latter; we tolerate it): the resource's multipart default."""
    return media.type in ANY or (media.type == MULTIPART_RELATED and media.related_type == "*/*")


def _best(choices: Iterable[tuple[MediaRange, T | None]], syntax_of: Callable[[T], str]) -> T:
    """Azure's pick among the Accept ranges (sorted best q first): the first acceptable one wins, unless a later
    acceptable one of the same q asks for the original transfer syntax (``*``)."""
    best: T | None = None
    best_q = 0.0
    for media, choice in choices:
        if choice is None:
            continue
        if best is None:
            best, best_q = choice, media.q
        elif syntax_of(choice) == ORIGINAL and syntax_of(best) != ORIGINAL and media.q >= best_q:
            best = choice
    if best is None:
        raise NotAcceptable()
    return best


def negotiate_instances(accept: str | None, single_allowed: bool) -> tuple[bool, str]:
    """(multipart?, transfer syntax) for a DICOM retrieve."""

    def choice(media: MediaRange) -> tuple[bool, str] | None:
        if _any_multipart(media):  # multipart application/dicom, as stored unless a syntax is given
            multipart, syntax = True, media.transfer_syntax or ORIGINAL
        elif media.type == MULTIPART_RELATED and media.related_type in (None, DICOM):
            multipart, syntax = True, media.transfer_syntax or ExplicitVRLittleEndian
        elif media.type == DICOM and single_allowed:
            multipart, syntax = False, media.transfer_syntax or ExplicitVRLittleEndian
        else:
            return None
        return (multipart, syntax) if syntax in INSTANCE_SYNTAXES else None

    return _best(((m, choice(m)) for m in parse_accept(accept)), lambda c: c[1])


def negotiate_frames(accept: str | None) -> tuple[bool, str, str]:
    """(multipart?, part media type, transfer syntax) for a frames retrieve."""

    def choice(media: MediaRange) -> tuple[bool, str, str] | None:
        if _any_multipart(media):  # multipart application/octet-stream, as stored unless a syntax is given
            multipart, part_type, syntax = True, OCTET_STREAM, media.transfer_syntax or ORIGINAL
        elif media.type == MULTIPART_RELATED:
            part_type = media.related_type or OCTET_STREAM
            if part_type not in FRAME_MEDIA:
                return None
            multipart, syntax = True, media.transfer_syntax or FRAME_MEDIA[part_type][0]
        elif media.type in FRAME_MEDIA:
            multipart, part_type, syntax = False, media.type, media.transfer_syntax or FRAME_MEDIA[media.type][0]
        else:
            return None
        return (multipart, part_type, syntax) if syntax in FRAME_MEDIA[part_type] else None

    return _best(((m, choice(m)) for m in parse_accept(accept)), lambda c: c[2])


# Bodies up to this size are read in the worker thread and sent at once; larger ones are streamed.
SMALL_BODY = 8 * 1024 * 1024


def wants_original(request: Request) -> bool:
    """``msdicom-request-original: true``: the version first stored, before any bulk update (Azure's header)."""
    return request.headers.get("msdicom-request-original", "").strip().lower() == "true"


async def _retrieve(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    study, series, sop = scope.study, scope.series, scope.sop
    multipart, syntax = negotiate_instances(request_accept(request), single_allowed=sop is not None)
    retrieve = ctx.services.retrieve

    def find() -> tuple[list[StoredInstance], Part | None, bytes | None]:
        """A named syntax means one instance (Azure's rule): it is read, or transcoded, here, so that a transcoding
        failure is a 406 before the response starts."""
        found = retrieve.instances(ctx.partition(), study, series, sop, wants_original(request))
        retrieve.check_transfer_syntax(found, syntax)
        if multipart and syntax == ORIGINAL:
            return found, None, None
        single = retrieve.file(found[0], syntax)
        as_stored = single.transfer_syntax == found[0].transfer_syntax_uid
        small = not as_stored or found[0].file_size <= SMALL_BODY
        return found, single, b"".join(single.chunks) if small else None

    found, single, body = await run_in_threadpool(find)
    if single is not None and multipart:
        chunks = iter([body]) if body is not None else single.chunks
        boundary = new_boundary()
        labelled = [(f"{DICOM}; transfer-syntax={single.transfer_syntax}", chunks)]
        return StreamingResponse(multipart_body(labelled, boundary), media_type=multipart_content_type(DICOM, boundary))
    if single is not None:
        media = f"{DICOM}; transfer-syntax={single.transfer_syntax}"
        if body is not None:
            return Response(body, media_type=media)
        return StreamingResponse(single.chunks, media_type=media, headers={"Content-Length": str(found[0].file_size)})

    boundary = new_boundary()

    def parts():
        for inst in found:
            part = retrieve.file(inst, syntax)
            yield f"{DICOM}; transfer-syntax={part.transfer_syntax}", part.chunks

    # every part is a stored file, as stored: the body's length is known before it is read
    length = multipart_length(
        ((f"{DICOM}; transfer-syntax={i.transfer_syntax_uid}", i.file_size) for i in found), boundary
    )
    return StreamingResponse(
        multipart_body(parts(), boundary),
        media_type=multipart_content_type(DICOM, boundary),
        headers={"Content-Length": str(length)},
    )


add_scope_routes(
    router,
    "GET",
    "",
    _retrieve,
    {"study": "Retrieve a study", "series": "Retrieve a series", "instance": "Retrieve an instance"},
    **RETRIEVE_DOC,
)


async def _metadata(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    study, series, sop = scope.study, scope.series, scope.sop
    accept = request_accept(request)
    if not accepts_dicom_json(accept):
        return Response(status_code=406)
    from dicomhub.api.bulkdata import wants_bulkdata_uris  # here: the bulk data routes are a separate module

    settings = ctx.services.settings
    uris = wants_bulkdata_uris(request.query_params.get("bulkdata"), accept, settings.metadata_bulkdata)
    retrieve = ctx.services.retrieve
    if_none_match = request.headers.get("if-none-match")

    def read() -> tuple[str, str]:
        if uris:  # bulk values as BulkDataURI, from the stored files (opt-in; Azure leaves them out)
            return ctx.services.bulkdata.metadata(ctx.partition(), study, series, sop, ctx.base_url())
        return retrieve.metadata(ctx.partition(), study, series, sop, wants_original(request))

    etag, body = await run_in_threadpool(read)
    if etag_matches(if_none_match, etag):
        return Response(status_code=304)
    return json_response(request, body, headers={"ETag": etag})


add_scope_routes(
    router,
    "GET",
    "/metadata",
    _metadata,
    {"study": "Metadata of a study", "series": "Metadata of a series", "instance": "Metadata of an instance"},
    **METADATA_DOC,
)


async def _frames(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    study, series, instance = scope.study, scope.series, scope.sop
    numbers = parse_frame_numbers(scope.frames or "")
    multipart, media_type, syntax = negotiate_frames(request_accept(request))
    if not multipart and len(numbers) > 1:
        raise InvalidRequest(SINGLE_FRAME_ONLY)
    retrieve = ctx.services.retrieve
    boundary = new_boundary()

    def read() -> tuple[list[Part], bytes | None]:
        """Frames are usually small: read them here, in the worker thread, and answer in one piece."""
        found = retrieve.instances(ctx.partition(), study, series, instance)
        parts = retrieve.frames(found[0], numbers, syntax)
        if found[0].file_size > SMALL_BODY:
            return parts, None
        if not multipart:
            return parts, b"".join(parts[0].chunks)
        labelled = ((f"{media_type}; transfer-syntax={p.transfer_syntax}", p.chunks) for p in parts)
        return parts, b"".join(multipart_body(labelled, boundary))

    parts, body = await run_in_threadpool(read)
    if not multipart:
        media = f"{media_type}; transfer-syntax={parts[0].transfer_syntax}"
        return (
            Response(body, media_type=media)
            if body is not None
            else StreamingResponse(parts[0].chunks, media_type=media)
        )
    if body is not None:
        return Response(body, media_type=multipart_content_type(media_type, boundary))
    labelled = ((f"{media_type}; transfer-syntax={p.transfer_syntax}", p.chunks) for p in parts)
    return StreamingResponse(
        multipart_body(labelled, boundary), media_type=multipart_content_type(media_type, boundary)
    )


add_scope_routes(router, "GET", "", _frames, {"frames": "Retrieve frames"}, **frames_doc(FRAME_MEDIA))
