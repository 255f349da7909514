"""``GET /health/check`` (Azure's shape) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from dicomhub.api.openapi import HEALTH_DOC

router = APIRouter(tags=["Operations"])


@router.get("/health/check", summary="Health of the index and the blob store", **HEALTH_DOC)
async def health(request: Request) -> Response:
    services = request.app.state.services
    details = []
    for name, probe, description in (
        ("DicomBlobHealthCheck", services.blobs.health, "The blob store can be written."),
        ("IndexHealthCheck", services.index.ping, "The index database answers."),
    ):
        try:
            await run_in_threadpool(probe)
            details.append({"name": name, "status": "Healthy", "description": description})
        except Exception as exc:  # any failure means unhealthy; the reason is reported, not raised
            details.append({"name": name, "status": "Unhealthy", "description": str(exc)})
    healthy = all(d["status"] == "Healthy" for d in details)
    return JSONResponse(
        {"overallStatus": "Healthy" if healthy else "Unhealthy", "details": details},
        status_code=200 if healthy else 503,
    )


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics() -> Response:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several worker processes: add up their counters
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
