"""Response helpers shared by the routers."""

from __future__ import annotations

import gzip
import json
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from dicomhub.api.media import DICOM_JSON

# Level 1: DICOM JSON is repetitive enough that it compresses to about the same size as at level 5, in a third of
# the time; on a LAN the CPU, not the bytes, bounds a metadata or search answer.
GZIP_LEVEL = 1


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON; orjson, with the standard library for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match holds the ETag: compared without quotes and ignoring case as Azure does, weak (``W/``), listed
    and ``*`` values tolerated as browsers and HTTP caches send them."""
    if not header:
        return False
    plain = etag.strip('"').lower()
    candidates = (c.strip().removeprefix("W/").removeprefix("w/").strip('"').lower() for c in header.split(","))
    return any(c in (plain, "*") for c in candidates)


def json_response(
    request: Request,
    body: str | bytes | Any,
    status_code: int = 200,
    media_type: str = DICOM_JSON,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON answer, gzipped when the client accepts it and it is worth it (JSON only: pixels are not)."""
    if not isinstance(body, str | bytes):
        body = json_bytes(body)
    data = body.encode() if isinstance(body, str) else body
    headers = dict(headers or {})
    settings = request.app.state.services.settings
    if len(data) > settings.gzip_min_size and "gzip" in request.headers.get("accept-encoding", "").lower():
        data = gzip.compress(data, compresslevel=GZIP_LEVEL)
        headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
    return Response(data, status_code=status_code, media_type=media_type, headers=headers)
