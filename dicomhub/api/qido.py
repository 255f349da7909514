"""QIDO-RS: the six search resources."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import RequestContext, check_uid, studies_context
from dicomhub.api.media import ACCEPT_PARAMETER, accepts_dicom_json, request_accept
from dicomhub.api.openapi import search_doc
from dicomhub.api.responses import json_response
from dicomhub.dicom.tags import parse_attribute_id
from dicomhub.domain.attributes import SERIES_UID, STUDY_UID
from dicomhub.domain.errors import InvalidRequest
from dicomhub.domain.query import SearchRequest, parse_search

router = APIRouter(tags=["QIDO-RS"])


async def _search(
    request: Request, ctx: RequestContext, resource: str, study: str | None = None, series: str | None = None
) -> Response:
    raw_query = request.url.query
    if "<" in raw_query or "%3c" in raw_query.lower():
        raise InvalidRequest("The query string included invalid characters.")
    if not accepts_dicom_json(request_accept(request)):
        return Response(status_code=406)
    if study is not None:
        study = check_uid(study, "StudyInstanceUID")
    if series is not None:
        series = check_uid(series, "SeriesInstanceUID")
    params = [(name, value) for name, value in request.query_params.multi_items() if name != ACCEPT_PARAMETER]
    in_path = ({STUDY_UID} if study is not None else set()) | ({SERIES_UID} if series is not None else set())
    for name, _ in params:
        if parse_attribute_id(name) in in_path:
            raise InvalidRequest(f"Invalid query: AttributeId '{name}' is already specified in the path.")
    lookup = ctx.services.extended_tags.lookup

    def run() -> tuple[SearchRequest, list]:  # in a worker thread: an extended tag is looked up in the index
        search = parse_search(params, resource, ctx.api_version, study, series, lookup)
        return search, ctx.services.query.search(ctx.partition(), search)

    search, results = await run_in_threadpool(run)
    # Azure's header when a query uses extended tags whose index has errors (query re-enabled by hand)
    headers = {"erroneous-dicom-attributes": ",".join(search.erroneous)} if search.erroneous else None
    if not results:
        return Response(status_code=204, headers=headers)
    return json_response(request, results, headers=headers)


@router.get("/studies", summary="Search for studies", **search_doc("studies"))
async def search_studies(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _search(request, ctx, "studies")


@router.get("/series", summary="Search for series", **search_doc("series"))
async def search_series(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _search(request, ctx, "series")


@router.get("/instances", summary="Search for instances", **search_doc("instances"))
async def search_instances(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _search(request, ctx, "instances")


@router.get("/studies/{study}/series", summary="Search for series of a study", **search_doc("study-series"))
async def search_study_series(study: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    return await _search(request, ctx, "study-series", study)


@router.get("/studies/{study}/instances", summary="Search for instances of a study", **search_doc("study-instances"))
async def search_study_instances(
    study: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _search(request, ctx, "study-instances", study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="Search for instances of a series",
    **search_doc("series-instances"),
)
async def search_series_instances(
    study: str, series: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    return await _search(request, ctx, "series-instances", study, series)
