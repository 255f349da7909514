"""Delete (Azure's non-standard extension): study, series or instance."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import RequestContext
from dicomhub.api.openapi import DELETE_DOC
from dicomhub.api.scopes import Scope, add_scope_routes

router = APIRouter(tags=["Delete"])


async def _delete(request: Request, ctx: RequestContext, scope: Scope) -> Response:
    await run_in_threadpool(lambda: ctx.services.delete.delete(ctx.partition(), scope.study, scope.series, scope.sop))
    return Response(status_code=204)


add_scope_routes(
    router,
    "DELETE",
    "",
    _delete,
    {"study": "Delete a study", "series": "Delete a series", "instance": "Delete an instance"},
    **DELETE_DOC,
)
