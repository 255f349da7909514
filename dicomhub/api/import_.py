"""``POST /v{n}[/partitions/{p}]/import``: starts an import operation from a bucket, container or folder (202)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import RequestContext, studies_context
from dicomhub.api.export import require_json, started
from dicomhub.api.json_body import read_json_body
from dicomhub.api.openapi import IMPORT_DOC
from dicomhub.domain.import_ import parse_import_request, start_import

router = APIRouter(tags=["Export and import"])


@router.post("/import", summary="Store every DICOM file under a bucket, container or folder prefix", **IMPORT_DOC)
async def import_files(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    require_json(request)
    document = await read_json_body(request)
    parameters = await run_in_threadpool(parse_import_request, document, ctx.services.settings)
    partition = await run_in_threadpool(ctx.partition_for_store)
    operation = await run_in_threadpool(start_import, ctx.services.operations, partition, parameters)
    return await started(request, operation)
