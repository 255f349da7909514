"""JSON request bodies, read in one place for every route that takes one: bounded in size (413) and in nesting
depth, so no body can exhaust memory or the parser's recursion. Anything that is not plain JSON within the bounds
is Azure's syntax error (400 "The syntax of the request body is invalid.")."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from dicomhub.domain.errors import BodySyntaxInvalid, PayloadTooLarge

MAX_JSON_BODY = 1024 * 1024  # the largest legitimate bodies (50 study UIDs, 128 tags) fit many times over
MAX_JSON_DEPTH = 64  # the deepest legitimate one (a change dataset) nests 5 levels


async def read_json_body(request: Request) -> Any:
    """The parsed body; the size bound holds while reading, so a huge body is refused before it is all in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise _too_large()
    return parse_json(bytes(body))


def parse_json(body: bytes) -> Any:
    """Strict JSON (no NaN or Infinity, no number that overflows a double) nested at most MAX_JSON_DEPTH deep."""
    try:
        document = json.loads(body, parse_constant=_reject, parse_float=_finite)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BodySyntaxInvalid() from None
    if _deeper_than(document, MAX_JSON_DEPTH):
        raise BodySyntaxInvalid()
    return document


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {MAX_JSON_BODY} bytes.")


def _reject(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} overflows a double")
    return value


def _deeper_than(document: Any, limit: int) -> bool:
    """Walks the document without recursion: the check must not fail the way it guards against."""
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        if children and depth >= limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False
