"""Delete (Azure's non-standard extension): study, series or instance."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import RequestContext, check_uid, studies_context

router = APIRouter(tags=["Delete"])


async def _delete(ctx: RequestContext, study: str, series: str | None = None, sop: str | None = None) -> Response:
    study = check_uid(study, "StudyInstanceUID")
    series = check_uid(series, "SeriesInstanceUID") if series is not None else None
    sop = check_uid(sop, "SOPInstanceUID") if sop is not None else None
    await run_in_threadpool(lambda: ctx.services.delete.delete(ctx.partition(), study, series, sop))
    return Response(status_code=204)


@router.delete("/studies/{study}", status_code=204, summary="Delete a study")
async def delete_study(study: str, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _delete(ctx, study)


@router.delete("/studies/{study}/series/{series}", status_code=204, summary="Delete a series")
async def delete_series(study: str, series: str, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _delete(ctx, study, series)


@router.delete("/studies/{study}/series/{series}/instances/{instance}", status_code=204, summary="Delete an instance")
async def delete_instance(
    study: str, series: str, instance: str, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _delete(ctx, study, series, instance)
