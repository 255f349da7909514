"""Builds the ASGI application: routers under /v{n} and /v{n}/partitions/{name}, middleware, background cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from dicomhub import __version__
from dicomhub.api import (
    bulk_update,
    bulkdata,
    changefeed,
    delete,
    export,
    extended_tags,
    health,
    home,
    import_,
    openapi,
    operations,
    partitions,
    qido,
    rendered,
    stow,
    wado,
    workitems,
)
from dicomhub.api.dispatch import DirectDispatch
from dicomhub.api.errors import install_error_handlers
from dicomhub.auth.actions import OPEN_ROUTES
from dicomhub.auth.middleware import install_security
from dicomhub.config import Settings
from dicomhub.services import Services, build_services

log = logging.getLogger("dicomhub.http")

REQUESTS = Counter("dicomhub_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("dicomhub_http_request_seconds", "HTTP request latency", ["method", "route"])
# bulk update first: STOW's POST /studies/{study} would take /studies/$bulkUpdate
STUDIES_ROUTERS = (
    bulk_update.router,
    stow.router,
    wado.router,
    bulkdata.router,
    rendered.router,
    qido.router,
    delete.router,
    workitems.router,
    export.router,
    import_.router,
)


class ObserveMiddleware:
    """Request log line and Prometheus metrics, as plain ASGI so streamed bodies pass through untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_observed(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, status).inc()
            LATENCY.labels(scope["method"], route).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round(elapsed * 1000, 2),
                },
            )


async def _cleanup_loop(services: Services) -> None:
    while True:
        try:
            await run_in_threadpool(services.cleanup.run_once)
        except Exception:
            log.exception("cleanup pass failed")
        await asyncio.sleep(services.settings.cleanup_interval_seconds)


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()
    services = services or build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_cleanup_loop(services))
        stop = threading.Event()
        worker = None
        if settings.run_operations:
            worker = threading.Thread(
                target=services.operation_worker().run, args=(stop,), name="operations", daemon=True
            )
            worker.start()
        cast = None
        if settings.cast_enabled:  # every server process tries; the cast's lease in the index lets one run
            from dicomhub.cast.runner import build_runner

            cast = threading.Thread(
                target=build_runner(settings, services=services).run, args=(stop,), name="cast", daemon=True
            )
            cast.start()
        yield
        stop.set()
        task.cancel()
        if worker is not None:
            await run_in_threadpool(worker.join, 30)
        if cast is not None:
            await run_in_threadpool(cast.join, 30)

    app = FastAPI(
        title="dicomhub",
        version=__version__,
        description="DICOMweb archive: STOW-RS, WADO-RS, QIDO-RS and delete, with data partitions.",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    for router in STUDIES_ROUTERS:
        app.include_router(router, prefix="/v{version}")
        app.include_router(router, prefix="/v{version}/partitions/{partition_name}")
    app.include_router(partitions.router)
    app.include_router(changefeed.router, prefix="/v{version}")  # cross-partition: no partition route
    app.include_router(operations.router)
    app.include_router(extended_tags.router)  # global: no partition route
    app.include_router(health.router)
    app.include_router(home.router)
    openapi.install(app, OPEN_ROUTES if settings.auth_enabled else None)

    app.add_middleware(DirectDispatch, fastapi=app)  # innermost: behind the security check, the log and CORS
    install_security(app, settings)  # inside the request log and CORS: refusals are logged and carry CORS
    app.add_middleware(ObserveMiddleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "ETag",
                "Content-Location",
                "Location",
                "Warning",
                "Content-Range",
                "Accept-Ranges",
                "WWW-Authenticate",
                "Retry-After",
                "X-Request-Id",
            ],
        )
    return app
