"""Response helpers shared by the routers."""

from __future__ import annotations

import gzip
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dicomhub.api.media import DICOM_JSON


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
        body = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    data = body.encode() if isinstance(body, str) else body
    headers = dict(headers or {})
    settings = request.app.state.services.settings
    if len(data) > settings.gzip_min_size and "gzip" in request.headers.get("accept-encoding", "").lower():
        data = gzip.compress(data, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
    return Response(data, status_code=status_code, media_type=media_type, headers=headers)
