"""``POST /v2[/partitions/{p}]/studies/$bulkUpdate``: starts an update operation (202 ``{id, href}``).

v2 and later only: on v1 the route does not exist (404, as in Azure). The body must be ``application/json``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import RequestContext, studies_context
from dicomhub.api.json_body import read_json_body
from dicomhub.api.openapi import BULK_UPDATE_DOC
from dicomhub.api.operations import operation_reference
from dicomhub.api.responses import json_response
from dicomhub.domain.bulk_update import ChangeDatasetInvalid, parse_update_request, start_update
from dicomhub.domain.errors import UnsupportedMediaType

router = APIRouter(tags=["Bulk update"])

JSON = "application/json"


# Azure's route is matched case-insensitively; clients write it as documented or, like Azure's Postman
# collection, all lower-case. This router comes before STOW's, whose POST /studies/{study} would take it otherwise.
@router.post("/studies/$bulkUpdate", summary="Update patient and study attributes of studies", **BULK_UPDATE_DOC)
@router.post("/studies/$bulkupdate", include_in_schema=False)
async def bulk_update(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    if ctx.api_version < 2:
        return Response(status_code=404)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON:
        raise UnsupportedMediaType(f"The content type '{content_type}' is not supported; use '{JSON}'.")
    try:
        update = parse_update_request(await read_json_body(request))
    except ChangeDatasetInvalid as invalid:
        return json_response(request, invalid.dataset(), status_code=400, media_type=JSON)
    operation = await run_in_threadpool(start_update, ctx.services.operations, ctx.partition(), update)
    reference = operation_reference(request, operation)
    return json_response(request, reference, status_code=202, media_type=JSON, headers={"Location": reference["href"]})
