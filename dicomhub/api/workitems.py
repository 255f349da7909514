"""Worklist service (UPS-RS, spec 5.8): ``/workitems`` push and pull routes, subscriptions, and the watch channel, a
WebSocket at ``/subscribers/{aet}`` (PS3.18 11.13). Registered under ``/v{n}`` and ``/v{n}/partitions/{name}``.

Failures of workitem requests answer a JSON string, as Azure's do (spec 5.14); the partition checks that run before
a handler keep the archive's plain-text answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response
from starlette.websockets import WebSocketDisconnect

from dicomhub.api.context import RequestContext, studies_context
from dicomhub.api.errors import status_of
from dicomhub.api.json_body import read_json_body
from dicomhub.api.media import ACCEPT_PARAMETER, DICOM_JSON, accepts_dicom_json, request_accept
from dicomhub.api.openapi import (
    CANCEL_WORKITEM_DOC,
    CHANGE_STATE_DOC,
    CREATE_WORKITEM_DOC,
    RETRIEVE_WORKITEM_DOC,
    SEARCH_WORKITEMS_DOC,
    SUBSCRIBE_DOC,
    SUSPEND_DOC,
    UNSUBSCRIBE_DOC,
    UPDATE_WORKITEM_DOC,
)
from dicomhub.api.responses import json_response
from dicomhub.domain.errors import DicomHubError, InvalidRequest, UnsupportedMediaType
from dicomhub.domain.workitems import (
    WorkitemConflict,
    WorkitemService,
    check_ae_title,
    dataset_from_body,
    parse_filters,
    parse_workitem_query,
)

log = logging.getLogger("dicomhub.watch")
router = APIRouter(tags=["Worklist (UPS-RS)"])

WATCH_POLL_SECONDS = 0.25  # how often a channel looks for new events of its AE title (any process may write them)
WATCH_BATCH = 100  # events read and sent at a time: the most a channel holds in memory


def _json_message(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(message), status_code=status, media_type="application/json", headers=headers)


def _done(status: int, headers: dict[str, str] | None = None) -> Response:
    """A success without a body, as Azure answers it (declared as empty text, like every body of the document)."""
    return PlainTextResponse("", status_code=status, headers=headers)


def _warning(request: Request, text: str) -> dict[str, str]:
    """Azure's header: ``Warning: 299 {host}: "{text}"`` (spec 5.8)."""
    return {"Warning": f'299 {request.url.netloc}: "{text}"'}


async def _answer(request: Request, work: Callable[[], Response]) -> Response:
    """Runs ``work`` in a worker thread; a domain error becomes a JSON-string answer."""
    try:
        return await run_in_threadpool(work)
    except DicomHubError as exc:
        headers = _warning(request, exc.message) if isinstance(exc, WorkitemConflict) and exc.warning else None
        return _json_message(exc.message, status_of(exc), headers)


def _service(ctx: RequestContext) -> WorkitemService:
    return ctx.services.workitems


def _first_query_key(request: Request) -> str | None:
    """Azure reads a UID as the *name* of the first query parameter (``/workitems?{uid}``)."""
    for name, _ in parse_qsl(request.url.query, keep_blank_values=True):
        if name != ACCEPT_PARAMETER:
            return name
    return None


async def _dataset(request: Request) -> dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (DICOM_JSON, "application/json"):
        raise UnsupportedMediaType(f"The specified content type '{content_type}' is not supported.")
    return dataset_from_body(await read_json_body(request))


async def _read_dataset(request: Request) -> dict | Response:
    try:
        return await _dataset(request)
    except DicomHubError as exc:
        return _json_message(exc.message, status_of(exc))


def _workitem_url(request: Request, uid: str) -> str:
    path = request.url.path
    return f"{request.url.scheme}://{request.url.netloc}{path[: path.rfind('/workitems')]}/workitems/{uid}"


# -- push -------------------------------------------------------------------------------------------------------------
@router.post("/workitems", summary="Create a workitem", **CREATE_WORKITEM_DOC)
async def create_workitem(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    if not accepts_dicom_json(request_accept(request)):
        return Response(status_code=406)
    model = await _read_dataset(request)
    if isinstance(model, Response):
        return model

    def work() -> Response:
        uid = _service(ctx).create(ctx.partition_for_store(), _first_query_key(request), model)
        url = _workitem_url(request, uid)
        return _done(201, {"Location": url, "Content-Location": url})

    return await _answer(request, work)


@router.get("/workitems/{workitem}", summary="Retrieve a workitem", **RETRIEVE_WORKITEM_DOC)
async def retrieve_workitem(
    workitem: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    if not accepts_dicom_json(request_accept(request)):
        return Response(status_code=406)
    return await _answer(request, lambda: json_response(request, _service(ctx).retrieve(ctx.partition(), workitem)))


@router.post("/workitems/{workitem}", summary="Update a workitem", **UPDATE_WORKITEM_DOC)
async def update_workitem(workitem: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    model = await _read_dataset(request)
    if isinstance(model, Response):
        return model

    def work() -> Response:
        _service(ctx).update(ctx.partition(), workitem, _first_query_key(request), model)
        return _done(200, {"Content-Location": _workitem_url(request, workitem)})

    return await _answer(request, work)


@router.put("/workitems/{workitem}/state", summary="Change the state of a workitem", **CHANGE_STATE_DOC)
async def change_state(workitem: str, request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    model = await _read_dataset(request)
    if isinstance(model, Response):
        return model

    def work() -> Response:
        warning = _service(ctx).change_state(ctx.partition(), workitem, model)
        return _done(200, _warning(request, warning) if warning else None)

    return await _answer(request, work)


@router.post(
    "/workitems/{workitem}/cancelrequest", summary="Request the cancellation of a workitem", **CANCEL_WORKITEM_DOC
)
async def request_cancellation(
    workitem: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    model = await _read_dataset(request)
    if isinstance(model, Response):
        return model
    return await _answer(
        request, lambda: _json_message(_service(ctx).request_cancel(ctx.partition(), workitem, model), 202)
    )


# -- pull -------------------------------------------------------------------------------------------------------------
@router.get("/workitems", summary="Search for workitems", **SEARCH_WORKITEMS_DOC)
async def search_workitems(request: Request, ctx: RequestContext = Depends(studies_context)) -> Response:
    if not accepts_dicom_json(request_accept(request)):
        return Response(status_code=406)
    raw_query = request.url.query
    params = [(name, value) for name, value in request.query_params.multi_items() if name != ACCEPT_PARAMETER]

    def work() -> Response:
        if "<" in raw_query or "%3c" in raw_query.lower():
            raise InvalidRequest("The query string included invalid characters.")
        results = _service(ctx).search(ctx.partition(), parse_workitem_query(params))
        return json_response(request, results) if results else Response(status_code=204)

    return await _answer(request, work)


# -- watch ------------------------------------------------------------------------------------------------------------
def _deletion_lock(request: Request) -> bool:
    value = request.query_params.get("deletionlock", "false").lower()
    if value not in ("true", "false"):
        raise InvalidRequest("The query parameter 'deletionlock' is invalid. The value must be 'true' or 'false'.")
    return value == "true"


@router.post("/workitems/{workitem}/subscribers/{aet}", summary="Subscribe to workitem events", **SUBSCRIBE_DOC)
async def subscribe(
    workitem: str, aet: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    def work() -> Response:
        filters = parse_filters(request.query_params.getlist("filter"))
        _service(ctx).subscribe(ctx.partition(), workitem, aet, _deletion_lock(request), filters)
        return _done(201)

    return await _answer(request, work)


@router.delete("/workitems/{workitem}/subscribers/{aet}", summary="Unsubscribe from workitem events", **UNSUBSCRIBE_DOC)
async def unsubscribe(
    workitem: str, aet: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    def work() -> Response:
        _service(ctx).unsubscribe(ctx.partition(), workitem, aet)
        return _done(200)

    return await _answer(request, work)


@router.post("/workitems/{workitem}/subscribers/{aet}/suspend", summary="Suspend a global subscription", **SUSPEND_DOC)
async def suspend(
    workitem: str, aet: str, request: Request, ctx: RequestContext = Depends(studies_context)
) -> Response:
    def work() -> Response:
        _service(ctx).suspend(ctx.partition(), workitem, aet)
        return _done(200)

    return await _answer(request, work)


@router.websocket("/subscribers/{aet}")
async def watch(websocket: WebSocket, aet: str) -> None:
    """The event channel of an AE title: every event queued for it, oldest first, one DICOM JSON text frame each.

    Events are rows in the index, so whichever process holds the socket delivers them; one is deleted once sent
    (at least once: a socket lost mid-batch gets the unconfirmed rest again). uvicorn pings the client and closes
    the socket at shutdown; a client's own frames are read and ignored, which also notices its close.
    """
    try:
        ctx = await studies_context(websocket)  # type: ignore[arg-type]  # a WebSocket has the same path params
        aet = check_ae_title(aet)
        partition = await run_in_threadpool(ctx.partition)
    except DicomHubError as exc:
        await _refuse(websocket, exc)
        return
    workitems = ctx.services.workitems
    await websocket.accept()
    gone = asyncio.Event()
    reader = asyncio.create_task(_read_until_closed(websocket, gone))
    try:
        while not gone.is_set():
            events = await run_in_threadpool(workitems.pending_events, partition, aet, WATCH_BATCH)
            sent = []
            for event in events:
                await websocket.send_text(event.payload)
                sent.append(event.key)
            await run_in_threadpool(workitems.delivered, sent)
            if len(events) < WATCH_BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), WATCH_POLL_SECONDS)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client went away while we were sending: what it did not confirm stays queued
    finally:
        reader.cancel()


async def _read_until_closed(websocket: WebSocket, gone: asyncio.Event) -> None:
    try:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        gone.set()


async def _refuse(websocket: WebSocket, exc: DicomHubError) -> None:
    """A plain-text HTTP answer to the handshake where the server can send one, else a policy-violation close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(PlainTextResponse(exc.message, status_code=status_of(exc)))
    else:
        await websocket.close(code=1008, reason=exc.message[:120])
