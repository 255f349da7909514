"""``GET /v{n}/operations/{id}``: state of a long-running operation (202 while it runs, 200 once it is done)."""

from __future__ import annotations

from datetime import UTC

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import version_of
from dicomhub.api.openapi import OPERATION_DOC
from dicomhub.api.responses import json_response
from dicomhub.domain.operations import Operation, OperationStatus

router = APIRouter(tags=["Operations"])


def version_root(request: Request) -> str:
    """``{scheme}://{host}/v{n}`` as the client addressed it."""
    return f"{request.url.scheme}://{request.url.netloc}/v{request.path_params['version']}"


def operation_reference(request: Request, operation: Operation) -> dict[str, str]:
    """Azure's answer to a request that started an operation: ``{id, href}``."""
    return {"id": operation.id, "href": f"{version_root(request)}/operations/{operation.id}"}


def operation_json(request: Request, operation: Operation, api_version: int) -> dict:
    status = operation.status.value
    if api_version == 1 and operation.status == OperationStatus.SUCCEEDED:
        status = "completed"  # v1 named success differently
    root = version_root(request)
    body = {
        "operationId": operation.id,
        "type": operation.type.value,
        "createdTime": operation.created_at.astimezone(UTC).isoformat(),
        "lastUpdatedTime": operation.updated_at.astimezone(UTC).isoformat(),
        "status": status,
        "percentComplete": operation.percent_complete,
        "resources": [f"{root}/{path}" for path in operation.resources],
    }
    if operation.results is not None:
        body["results"] = operation.results
    return body


@router.get("/v{version}/operations/{operation_id}", summary="State of a long-running operation", **OPERATION_DOC)
async def get_operation(version: str, operation_id: str, request: Request) -> Response:
    api_version = version_of(request)
    operations = request.app.state.services.operations
    operation = await run_in_threadpool(operations.get, operation_id)
    body = operation_json(request, operation, api_version)
    if operation.finished:
        return json_response(request, body, media_type="application/json")
    location = f"{version_root(request)}/operations/{operation.id}"
    return json_response(request, body, media_type="application/json", status_code=202, headers={"Location": location})
