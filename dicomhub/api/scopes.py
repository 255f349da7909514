"""Routes that do one thing at several levels (study, series, instance, frames): one handler, one registration.

The handler receives the request, its context and a :class:`Scope` whose UIDs are already checked, so each feature
writes its logic once and the path/UID plumbing lives here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from dicomhub.api.context import RequestContext, check_uid, studies_context


@dataclass(frozen=True)
class Scope:
    """What a request addresses; ``frames`` is the raw frame list of a frame route."""

    study: str
    series: str | None = None
    sop: str | None = None
    frames: str | None = None


Handler = Callable[[Request, RequestContext, Scope], Awaitable[Response]]

STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{instance}"
FRAMES = INSTANCE + "/frames/{frames}"
PATHS = {"study": STUDY, "series": SERIES, "instance": INSTANCE, "frames": FRAMES}


def _scope(study: str, series: str | None = None, sop: str | None = None, frames: str | None = None) -> Scope:
    return Scope(
        check_uid(study, "StudyInstanceUID"),
        check_uid(series, "SeriesInstanceUID") if series is not None else None,
        check_uid(sop, "SOPInstanceUID") if sop is not None else None,
        frames,
    )


def _endpoints(handler: Handler) -> dict[str, Callable[..., Awaitable[Response]]]:
    """One FastAPI endpoint per level, with the level's path parameters (so OpenAPI documents them)."""

    async def study(study: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
        return await handler(request, ctx, _scope(study))

    async def series(
        study: str, series: str, request: Request, ctx: RequestContext = Depends(studies_context)
    ) -> Response:
        return await handler(request, ctx, _scope(study, series))

    async def instance(
        study: str, series: str, instance: str, request: Request, ctx: RequestContext = Depends(studies_context)
    ) -> Response:
        return await handler(request, ctx, _scope(study, series, instance))

    async def frames(
        study: str,
        series: str,
        instance: str,
        frames: str,
        request: Request,
        ctx: RequestContext = Depends(studies_context),
    ) -> Response:
        return await handler(request, ctx, _scope(study, series, instance, frames))

    return {"study": study, "series": series, "instance": instance, "frames": frames}


def add_scope_routes(
    router: APIRouter, method: str, suffix: str, handler: Handler, summaries: dict[str, str], **options: Any
) -> None:
    """Registers ``handler`` at ``{level path}{suffix}`` for each level named in ``summaries`` (level → summary)."""
    endpoints = _endpoints(handler)
    for level, summary in summaries.items():
        router.add_api_route(PATHS[level] + suffix, endpoints[level], methods=[method], summary=summary, **options)
