"""``GET /v{n}/partitions``: the data partitions (tenants)."""

from __future__ import annotations

from datetime import UTC

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import version_of
from dicomhub.api.openapi import PARTITIONS_DOC
from dicomhub.api.responses import json_response
from dicomhub.domain.errors import InvalidRequest

router = APIRouter(tags=["Partitions"])


@router.get("/v{version}/partitions", summary="List data partitions", **PARTITIONS_DOC)
async def list_partitions(version: str, request: Request) -> Response:
    version_of(request)
    services = request.app.state.services
    if not services.settings.enable_partitions:
        raise InvalidRequest("Data partitions feature is disabled.")
    partitions = await run_in_threadpool(services.index.list_partitions)
    body = [
        {"partitionKey": p.key, "partitionName": p.name, "createdDate": p.created_at.astimezone(UTC).isoformat()}
        for p in partitions
    ]
    return json_response(request, body, media_type="application/json")
