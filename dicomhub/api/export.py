"""``POST /v{n}[/partitions/{p}]/export``: starts an export operation (202 ``{id, href}`` + ``Location``).

The body is ``application/json`` in Azure's shape (spec 5.6), with s3/filesystem destinations and ``deidentify``
beyond Azure. The destination is checked before the operation starts (a missing container or bucket is a 400).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import RequestContext, studies_context
from dicomhub.api.json_body import read_json_body
from dicomhub.api.openapi import EXPORT_DOC
from dicomhub.api.operations import operation_reference
from dicomhub.api.responses import json_response
from dicomhub.domain.errors import UnsupportedMediaType
from dicomhub.domain.export import parse_export_request, start_export

router = APIRouter(tags=["Export and import"])

JSON = "application/json"


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON:
        raise UnsupportedMediaType(f"The content type '{content_type}' is not supported; use '{JSON}'.")


async def started(request: Request, operation) -> Response:
    reference = operation_reference(request, operation)
    return json_response(request, reference, status_code=202, media_type=JSON, headers={"Location": reference["href"]})


@router.post("/export", summary="Export studies, series and instances to a container, bucket or folder", **EXPORT_DOC)
async def export(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    require_json(request)
    document = await read_json_body(request)
    parameters = await run_in_threadpool(parse_export_request, document, ctx.services.settings)
    partition = await run_in_threadpool(ctx.partition)
    operation = await run_in_threadpool(start_export, ctx.services.operations, partition, parameters)
    return await started(request, operation)
