"""One place that turns domain errors into HTTP answers (plain-text messages, as Azure's service does)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response

from dicomhub.domain.errors import (
    Conflict,
    DicomHubError,
    InvalidRequest,
    NotAcceptable,
    PayloadTooLarge,
    ResourceNotFound,
    ServiceUnavailable,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)

STATUS = {
    InvalidRequest: 400,
    ResourceNotFound: 404,
    NotAcceptable: 406,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    ServiceUnavailable: 503,
}
INTERNAL_ERROR = (
    "The server encountered an internal error. Please retry the request. If the issue persists, please contact support."
)


def status_of(exc: DicomHubError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DicomHubError)
    async def _domain(_: Request, exc: DicomHubError) -> Response:
        return PlainTextResponse(exc.message, status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        name = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return PlainTextResponse(f"The query parameter '{name}' is invalid. {first.get('msg', '')}", status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return PlainTextResponse(str(exc.detail or ""), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return PlainTextResponse(INTERNAL_ERROR, status_code=500)
