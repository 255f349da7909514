"""``GET /v{n}/changefeed`` and ``/v{n}/changefeed/latest``: the cross-partition feed of creates, deletes and
updates (no partition route: the feed spans all partitions)."""

from __future__ import annotations

import json
from datetime import UTC

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from dicomhub.api.context import version_of
from dicomhub.api.openapi import CHANGE_FEED_DOC, LATEST_CHANGE_DOC
from dicomhub.api.responses import json_response
from dicomhub.domain.changefeed import ChangeFeedEntry, ChangeFeedService, include_metadata_of, parse_feed

router = APIRouter(tags=["Change feed"])
JSON = "application/json"


def _service(request: Request) -> ChangeFeedService:
    return ChangeFeedService(request.app.state.services.index)


def _entry_json(entry: ChangeFeedEntry) -> str:
    """One entry in camelCase; the stored metadata JSON is spliced in as it is rather than parsed and re-encoded."""
    head = json.dumps(
        {
            "sequence": entry.sequence,
            "partitionName": entry.partition_name,
            "studyInstanceUid": entry.study_uid,
            "seriesInstanceUid": entry.series_uid,
            "sopInstanceUid": entry.sop_uid,
            "action": entry.action,
            "timestamp": entry.timestamp.astimezone(UTC).isoformat(timespec="microseconds"),
            "state": entry.state,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return head if entry.metadata_json is None else f'{head[:-1]},"metadata":{entry.metadata_json}}}'


@router.get("/changefeed", summary="Read the change feed", **CHANGE_FEED_DOC)
async def read_feed(version: str, request: Request) -> Response:
    api_version = version_of(request)
    feed = parse_feed(request.query_params.multi_items(), api_version)
    entries = await run_in_threadpool(_service(request).read, feed, api_version)
    return json_response(request, "[" + ",".join(_entry_json(e) for e in entries) + "]", media_type=JSON)


@router.get("/changefeed/latest", summary="Read the newest change-feed entry", **LATEST_CHANGE_DOC)
async def read_latest(version: str, request: Request) -> Response:
    api_version = version_of(request)
    include_metadata = include_metadata_of(request.query_params.multi_items())
    entry = await run_in_threadpool(_service(request).latest, api_version, include_metadata)
    if entry is None:
        return Response(status_code=204)  # as Azure's service answers a null entry
    return json_response(request, _entry_json(entry), media_type=JSON)
