"""Bulk data routes: the values that metadata BulkDataURIs name, and pixel data (CP-2040), with HTTP Range.

``GET …/instances/{i}/bulkdata/{path}`` returns one element value as stored (``path`` as in
:mod:`dicomhub.dicom.bulkdata`: ``00420011``, ``00880200/0/7FE00010``); ``GET …/pixeldata`` (instance, series or
study) the top-level pixel data: native as one value, encapsulated as one part per frame in the stored transfer
syntax. Both are ``multipart/related; type="application/octet-stream"`` (PS3.18's default) or, for a single value,
``application/octet-stream``; each part (and a single-part answer) names its transfer syntax and Content-Location.
A ``Range`` of one byte range applies when the answer is one value, in either form.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from dicomhub.api.context import RequestContext, check_uid, studies_context
from dicomhub.api.media import (
    DICOM_JSON,
    MULTIPART_RELATED,
    OCTET_STREAM,
    multipart_body,
    multipart_content_type,
    new_boundary,
    parse_accept,
    request_accept,
)
from dicomhub.api.openapi import BULKDATA_DOC, PIXELDATA_DOC
from dicomhub.api.scopes import Scope, add_scope_routes
from dicomhub.domain.bulkdata import PixelData, Value, instance_url
from dicomhub.domain.errors import InvalidRequest, NotAcceptable

router = APIRouter(tags=["Bulk data"])

BULKDATA_MODES = {"uri": True, "omit": False}
_JSON_TYPES = (DICOM_JSON, "application/json", "*/*", "application/*")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
Served = tuple[Value, str]  # a value and its Content-Location


def wants_bulkdata_uris(query_value: str | None, accept: str, default: bool) -> bool:
    """Whether metadata should carry BulkDataURI: ``?bulkdata=uri|omit``, else a ``bulkdata=uri|omit`` parameter
    of the DICOM JSON media range in Accept, else the server's default (``DICOMHUB_METADATA_BULKDATA``)."""
    value = query_value
    if value is None:
        value = next(
            (m.params["bulkdata"] for m in parse_accept(accept) if m.type in _JSON_TYPES and "bulkdata" in m.params),
            None,
        )
    if value is None:
        return default
    mode = BULKDATA_MODES.get(value.strip().lower())
    if mode is None:
        raise InvalidRequest(
            f"The bulkdata value '{value}' is invalid: use 'uri' (bulk values as BulkDataURI) or 'omit' (left out)."
        )
    return mode


class _Unsatisfiable(Exception):
    pass


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(start, length) of a ``Range: bytes=a-b`` / ``a-`` / ``-n`` header over ``total`` bytes. ``None`` (serve the
    whole value, as RFC 9110 allows) when absent, malformed or several ranges; raises when unsatisfiable."""
    match = _RANGE.match(header or "")
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last n bytes
        suffix = int(last)
        if suffix == 0 or total == 0:
            raise _Unsatisfiable
        return max(total - suffix, 0), min(suffix, total)
    start = int(first)
    end = int(last) if last else start
    if end < start:
        return None  # invalid: ignored
    if start >= total:
        raise _Unsatisfiable
    end = int(last) if last else total - 1
    return start, min(end, total - 1) - start + 1


def _syntax_ok(requested: str | None, actual: str) -> bool:
    """Values are served as stored: ``*`` or the stored syntax; Explicit VR Little Endian is accepted for Implicit
    VR Little Endian too (their values are the same bytes)."""
    return requested in (None, "*", actual) or (
        requested == ExplicitVRLittleEndian and actual == ImplicitVRLittleEndian
    )


def negotiate(accept: str, syntaxes: set[str], single: bool) -> bool:
    """Multipart (True) or single part (False, only for a ``single`` value) for values in ``syntaxes``; a missing
    Accept is ``*/*``."""
    for media in parse_accept(accept) or parse_accept("*/*"):
        if media.type in ("*/*", "multipart/*") or (
            media.type == MULTIPART_RELATED and media.related_type in (None, OCTET_STREAM, "*/*")
        ):
            multipart = True
        elif media.type in (OCTET_STREAM, "application/*") and single:
            multipart = False
        else:
            continue
        if all(_syntax_ok(media.transfer_syntax, s) for s in syntaxes):
            return multipart
    several = "" if single else f' (several values: multipart only, multipart/related; type="{OCTET_STREAM}")'
    raise NotAcceptable(
        f"The bulk data is served as {OCTET_STREAM}, single part or multipart, in its stored transfer syntax "
        f"({', '.join(sorted(syntaxes))}) or with transfer-syntax=*{several}."
    )


def _part_headers(value: Value, location: str, content_range: str | None) -> dict[str, str]:
    headers = {"Content-Type": f"{OCTET_STREAM}; transfer-syntax={value.transfer_syntax}", "Content-Location": location}
    if content_range:
        headers["Content-Range"] = content_range
    return headers


@dataclass
class _Found:
    """What a route serves: its values with their Content-Location (produced lazily for a study or series), the
    transfer syntaxes they are in, and the value itself when the answer is exactly one (single part, Range)."""

    served: Iterable[Served]
    syntaxes: set[str]
    single: Served | None

    @classmethod
    def of(cls, served: list[Served]) -> _Found:
        return cls(served, {value.transfer_syntax for value, _ in served}, served[0] if len(served) == 1 else None)


async def _serve(request: Request, find: Callable[[], _Found]) -> Response:
    accept = request_accept(request)
    found = await run_in_threadpool(find)
    multipart = negotiate(accept, found.syntaxes, found.single is not None)
    status, headers, window = 200, {}, None
    if found.single is not None:
        total = found.single[0].length
        try:
            window = parse_range(request.headers.get("range"), total)
        except _Unsatisfiable:
            message = f"The range '{request.headers.get('range')}' is outside the value's {total} bytes."
            return PlainTextResponse(message, status_code=416, headers={"Content-Range": f"bytes */{total}"})
        headers["Accept-Ranges"] = "bytes"
        if window is not None:
            status = 206
            headers["Content-Range"] = f"bytes {window[0]}-{window[0] + window[1] - 1}/{total}"

    def chunks(value: Value) -> Iterator[bytes]:
        return value.chunks(*window) if window is not None else value.chunks()

    if not multipart:
        value, location = found.single
        headers["Content-Location"] = location
        headers["Content-Length"] = str(window[1] if window is not None else value.length)
        media = f"{OCTET_STREAM}; transfer-syntax={value.transfer_syntax}"
        return StreamingResponse(chunks(value), status_code=status, media_type=media, headers=headers)
    boundary = new_boundary()
    parts = ((_part_headers(v, loc, headers.get("Content-Range")), chunks(v)) for v, loc in found.served)
    return StreamingResponse(
        multipart_body(parts, boundary),
        status_code=status,
        media_type=multipart_content_type(OCTET_STREAM, boundary),
        headers=headers,
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}",
    summary="Retrieve one bulk data value (the BulkDataURI of metadata retrieved with bulkdata=uri)",
    **BULKDATA_DOC,
)
async def retrieve_bulkdata(
    study: str, series: str, instance: str, path: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    study = check_uid(study, "StudyInstanceUID")
    series = check_uid(series, "SeriesInstanceUID")
    instance = check_uid(instance, "SOPInstanceUID")

    def find() -> _Found:
        value = ctx.services.bulkdata.value(ctx.partition(), study, series, instance, path)
        return _Found.of([(value, str(request.url.replace(query="")))])

    return await _serve(request, find)


async def _pixeldata(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    study, series, sop = scope.study, scope.series, scope.sop

    service, base = ctx.services.bulkdata, ctx.base_url()

    def served(pixels: PixelData) -> list[Served]:
        url = instance_url(base, pixels.instance)
        if pixels.per_frame:
            return [(value, f"{url}/frames/{n}") for n, value in enumerate(pixels.values, 1)]
        return [(pixels.values[0], f"{url}/pixeldata")]

    def find() -> _Found:
        if sop is not None:
            return _Found.of(served(service.instance_pixel_data(ctx.partition(), study, series, sop)))
        syntaxes, each = service.scope_pixel_data(ctx.partition(), study, series)
        first = next(each)  # parsed here, so that a scope without pixel data is a 404 before the answer starts
        return _Found((s for pixels in itertools.chain([first], each) for s in served(pixels)), syntaxes, None)

    return await _serve(request, find)


add_scope_routes(
    router,
    "GET",
    "/pixeldata",
    _pixeldata,
    {
        "study": "Pixel data of a study (CP-2040)",
        "series": "Pixel data of a series (CP-2040)",
        "instance": "Pixel data of an instance (CP-2040)",
    },
    **PIXELDATA_DOC,
)
