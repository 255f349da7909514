"""Rendered resources (PS3.18 10.4.1.1.3) and thumbnails (Supplement 203) of studies, series, instances and frames.

Accept: none, ``*/*`` or ``image/*`` -> JPEG (PS3.18's default; Azure answers 406 to ``*/*``); otherwise exactly one
of ``image/jpeg``, ``image/png`` or (rendered only) ``image/gif``; more than one media type -> 406 (Azure). An
encapsulated document or video instance is rendered as its own bytes (``application/pdf``, ``video/mp4``, ...), which
the Accept header must then allow (none, ``*/*`` or that type).

Answers carry an ETag (instance watermark + parameters) and ``Cache-Control: private, no-cache``: a browser keeps the
image and revalidates it, which costs one index lookup and no pixel work.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from dicomhub.api.context import RequestContext
from dicomhub.api.media import parse_media_type, request_accept
from dicomhub.api.openapi import RENDERED_DOC, THUMBNAIL_DOC
from dicomhub.api.responses import etag_matches
from dicomhub.api.scopes import Scope, add_scope_routes
from dicomhub.dicom.render import GIF, JPEG, PNG, WINDOW_FUNCTIONS, RenderOptions, Viewport, Window
from dicomhub.domain.errors import InvalidRequest, NotAcceptable
from dicomhub.domain.render import document_type
from dicomhub.domain.retrieve import parse_frame_numbers

router = APIRouter(tags=["Rendered"])

MULTIPLE_ACCEPT = "The request contains multiple accept headers, which is not supported."
BAD_QUALITY = "Image quality must be between 1 and 100 inclusive"
MAX_VIEWPORT = 8192
CACHE_CONTROL = "private, no-cache"
ANY = (None, "*/*", "image/*")


# -- parameters ------------------------------------------------------------------------------------------------------
def requested_type(request: Request) -> str | None:
    """The one media type the request accepts (every header line counted, or the ``accept`` query parameter), None
    when there is none."""
    items = [item for item in request_accept(request).split(",") if item.strip()]
    if len(items) > 1:
        raise NotAcceptable(MULTIPLE_ACCEPT)
    return parse_media_type(items[0]).type if items else None


def image_type(requested: str | None, allowed: tuple[str, ...]) -> str:
    if requested in ANY:
        return JPEG
    if requested in allowed:
        return requested
    raise NotAcceptable(f"The requested media type '{requested}' is not supported; use one of {', '.join(allowed)}.")


def parse_quality(text: str | None) -> int:
    if text is None:
        return 100
    try:
        quality = int(text.strip())
    except ValueError:
        raise InvalidRequest(BAD_QUALITY) from None
    if not 1 <= quality <= 100:
        raise InvalidRequest(BAD_QUALITY)
    return quality


def parse_window(text: str | None) -> Window | None:
    """``center,width[,function]``, function linear (default), linear-exact or sigmoid (PS3.3 C.11.2.1.2)."""
    if text is None:
        return None
    invalid = InvalidRequest(
        f"The window value '{text}' is invalid: expected center,width[,function] with a function of linear, "
        "linear-exact or sigmoid, and a width of at least 1 (linear) or above 0."
    )
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise invalid
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise invalid from None
    function = parts[2].upper().replace("-", "_") if len(parts) == 3 else "LINEAR"
    if function not in WINDOW_FUNCTIONS or not (math.isfinite(center) and math.isfinite(width)):
        raise invalid
    if width < 1 if function == "LINEAR" else width <= 0:
        raise invalid
    return Window(center, width, function)


def parse_viewport(text: str | None) -> Viewport | None:
    """``vw,vh`` or ``vw,vh,sx,sy,sw,sh`` (PS3.18 8.3.5.1.3): fit into vw x vh, optionally of a source region."""
    if text is None:
        return None
    invalid = InvalidRequest(
        f"The viewport value '{text}' is invalid: expected vw,vh[,sx,sy,sw,sh] with vw and vh from 1 to "
        f"{MAX_VIEWPORT}, sx and sy at least 0, and sw and sh not 0."
    )
    try:
        values = [int(p.strip()) for p in text.split(",")]
    except ValueError:
        raise invalid from None
    if len(values) not in (2, 6) or not all(1 <= v <= MAX_VIEWPORT for v in values[:2]):
        raise invalid
    region = None
    if len(values) == 6:
        sx, sy, sw, sh = values[2:]
        if sx < 0 or sy < 0 or sw == 0 or sh == 0:
            raise invalid
        region = (sx, sy, sw, sh)
    return Viewport(values[0], values[1], region)


def parse_frame(text: str) -> int:
    """One frame number: rendered takes a single frame."""
    numbers = parse_frame_numbers(text)
    if len(numbers) != 1:
        raise InvalidRequest(f"The specified frames value '{text}' is not valid: a rendered frame is one number.")
    return numbers[0]


# -- the shared handler ----------------------------------------------------------------------------------------------
async def _render(request: Request, ctx: RequestContext, scope: Scope, thumbnail: bool) -> Response:
    study, series, sop = scope.study, scope.series, scope.sop
    frame = parse_frame(scope.frames) if scope.frames is not None else None
    params = request.query_params
    quality = parse_quality(params.get("quality"))
    window = parse_window(params.get("window"))
    viewport = parse_viewport(params.get("viewport"))
    requested = requested_type(request)
    if_none_match = request.headers.get("if-none-match")
    service = ctx.services.render
    if thumbnail and viewport is None:
        size = ctx.services.settings.thumbnail_size
        viewport = Viewport(size, size)

    def work() -> Response:
        partition = ctx.partition()
        inst = service.locate(partition, study, series, sop)
        headers = {"Cache-Control": CACHE_CONTROL, "Vary": "Accept"}
        document = document_type(inst) if frame is None and not thumbnail else None
        if document is not None and (requested in (None, "*/*") or requested == document):
            headers["ETag"] = service.etag(inst, None, None)
            if etag_matches(if_none_match, headers["ETag"]):
                return Response(status_code=304, headers=headers)
            length, chunks = service.document(inst)
            headers["Content-Length"] = str(length)
            return StreamingResponse(chunks, media_type=document, headers=headers)
        allowed = (JPEG, PNG) if thumbnail else (JPEG, PNG, GIF)
        options = RenderOptions(image_type(requested, allowed), quality, window, viewport, enlarge=not thumbnail)
        headers["ETag"] = service.etag(inst, frame, options, thumbnail)
        if etag_matches(if_none_match, headers["ETag"]):
            return Response(status_code=304, headers=headers)
        body = service.thumbnail(partition, inst, frame, options) if thumbnail else service.image(inst, frame, options)
        return Response(body, media_type=options.media_type, headers=headers)

    return await run_in_threadpool(work)


RENDER_PARAMS = (
    " Query: quality (1-100, JPEG), window=center,width[,linear|linear-exact|sigmoid], viewport=vw,vh[,sx,sy,sw,sh]."
)


async def _rendered(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    return await _render(request, ctx, scope, thumbnail=False)


async def _thumbnail(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    return await _render(request, ctx, scope, thumbnail=True)


add_scope_routes(
    router,
    "GET",
    "/rendered",
    _rendered,
    {
        "study": "Rendered study (its representative image)",
        "series": "Rendered series (its representative image)",
        "instance": "Rendered instance (frame 1; every frame as image/gif; documents and video as stored)",
        "frames": "Rendered frame",
    },
    description=RENDER_PARAMS,
    **RENDERED_DOC,
)
add_scope_routes(
    router,
    "GET",
    "/thumbnail",
    _thumbnail,
    {
        "study": "Thumbnail of a study",
        "series": "Thumbnail of a series",
        "instance": "Thumbnail of an instance",
        "frames": "Thumbnail of a frame",
    },
    description=RENDER_PARAMS,
    **THUMBNAIL_DOC,
)
