"""Media types: tolerant Accept parsing, multipart/related writing and streaming reading."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, unquote_plus

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.requests import Request

from dicomhub.blobs.base import MEMORY_PART_LIMIT, MEMORY_REQUEST_LIMIT, Staged
from dicomhub.domain.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"

_PARAM = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')
# RFC 2046 boundaries (no trailing space; quotes and backslashes would not survive a header). RFC 2046 asks for at
# most 70 characters, but real clients send more (Orthanc's DICOMweb plugin: 73), so up to 200 are read.
MAX_BOUNDARY_LENGTH = 200
_BOUNDARY = re.compile(rf"[ !#-\[\]-~]{{0,{MAX_BOUNDARY_LENGTH - 1}}}[!#-\[\]-~]")


@dataclass(frozen=True)  # parsed ranges are cached and shared
class MediaRange:
    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    @property
    def related_type(self) -> str | None:
        value = self.params.get("type")
        return value.lower() if value else None


def _split_outside_quotes(header: str) -> list[str]:
    items, current, quoted = [], [], False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]


def parse_media_type(text: str) -> MediaRange:
    """``type/subtype; a=b; c="d"`` with case-insensitive names and optional quotes."""
    base, _, rest = text.partition(";")
    params: dict[str, str] = {}
    q = 1.0
    for name, value in _PARAM.findall(";" + rest):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        name = name.lower()
        if name == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        else:
            params[name] = value
    return MediaRange(base.strip().lower(), params, q)


@lru_cache(maxsize=512)  # clients send the same few Accept values on every request
def parse_accept(header: str | None) -> tuple[MediaRange, ...]:
    """The media ranges of an Accept header, best first (stable for equal q); q=0 ranges are dropped."""
    if not header:
        return ()
    ranges = [parse_media_type(item) for item in _split_outside_quotes(header)]
    return tuple(sorted((r for r in ranges if r.q > 0), key=lambda r: -r.q))


def accepts_dicom_json(header: str | None) -> bool:
    """Azure's rule for JSON routes: some range must match application/dicom+json."""
    return any(media.type in (DICOM_JSON, "application/json", "*/*", "application/*") for media in parse_accept(header))


ACCEPT_PARAMETER = "accept"


def request_accept(request: Request) -> str:
    """The Accept value a request is answered by: its ``accept`` query parameters when it has any (PS3.18 8.3.3.1:
    they override the header, for clients that cannot set headers, such as a browser's ``<img>``), else all its
    Accept header lines; either way one comma list, parsed like a header."""
    query = request.scope.get("query_string", b"").decode("latin-1")
    given = [
        _decode_media_types(raw)
        for name, _, raw in (item.partition("=") for item in query.split("&"))
        if unquote_plus(name) == ACCEPT_PARAMETER
    ]
    return ", ".join(given if given else request.headers.getlist("accept"))


def _decode_media_types(raw: str) -> str:
    """Percent-decodes a query value of media types. A raw ``+`` is a space in form encoding (``;+type=``, as httpx
    and Python's urlencode write it) but a plus in RFC 3986 (``application/dicom+json`` typed into a URL): it is read
    as a plus only between two letters or digits, where a media type list never has a space."""
    pieces = [unquote(piece) for piece in raw.split("+")]
    text = pieces[0]
    for piece in pieces[1:]:
        text += ("+" if text[-1:].isalnum() and piece[:1].isalnum() else " ") + piece
    return text


# -- multipart writing ---------------------------------------------------------------------------------------------
def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_content_type(part_type: str, boundary: str) -> str:
    return f'{MULTIPART_RELATED}; type="{part_type}"; boundary={boundary}'


# Streamed bodies are handed to the server in pieces of about this size: each piece costs a hop to a worker
# thread, so many small instances are sent together rather than one hop per header, file and delimiter.
STREAM_PIECE = 1 << 20


def _part_head(headers: str | dict[str, str], boundary: str) -> bytes:
    fields = {"Content-Type": headers} if isinstance(headers, str) else headers
    return (
        f"--{boundary}\r\n".encode()
        + "".join(f"{name}: {value}\r\n" for name, value in fields.items()).encode()
        + b"\r\n"
    )


def multipart_body(parts: Iterable[tuple[str | dict[str, str], Iterator[bytes]]], boundary: str) -> Iterator[bytes]:
    """Streams ``(content type or headers, chunks)`` parts as a multipart/related body, in pieces of about
    STREAM_PIECE."""
    pending: list[bytes] = []
    size = 0
    for headers, chunks in parts:
        for piece in itertools.chain((_part_head(headers, boundary),), chunks, (b"\r\n",)):
            pending.append(piece)
            size += len(piece)
            if size >= STREAM_PIECE:
                yield b"".join(pending)
                pending, size = [], 0
    pending.append(f"--{boundary}--\r\n".encode())
    yield b"".join(pending)


def multipart_length(parts: Iterable[tuple[str | dict[str, str], int]], boundary: str) -> int:
    """The length of :func:`multipart_body` for parts of known sizes ``(content type or headers, size)``: sent as
    Content-Length, it spares the chunked framing and lets clients read the body in one go (and show progress)."""
    closing = len(f"--{boundary}--\r\n")
    return closing + sum(len(_part_head(headers, boundary)) + size + 2 for headers, size in parts)


# -- multipart reading (STOW) --------------------------------------------------------------------------------------
class SpooledPart:
    """One uploaded part: kept in memory while the request's parts fit the memory limits, else spooled to a file
    (at most ``max_size`` bytes either way)."""

    def __init__(self, content_type: str | None, budget: MemoryBudget, max_size: int) -> None:
        self.content_type = content_type
        self.staged = Staged()
        self.size = 0
        self._budget = budget
        self._max = max_size
        self._file: BinaryIO | None = None

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self._max:
            raise PayloadTooLarge(f"A part of the request is larger than the limit of {self._max} bytes.")
        if self._file is not None:
            self._file.write(data)
            return
        if self.size > MEMORY_PART_LIMIT or not self._budget.take(len(data)):
            self._roll_over()
            self._file.write(data)
            return
        self.staged.data.extend(data)

    def _roll_over(self) -> None:
        path = self._budget.new_file()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(self.staged.data)
        self._budget.give_back(len(self.staged.data))
        self.staged = Staged(path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class MemoryBudget:
    """How much of one request may still be held in memory, and where its larger parts are spooled."""

    new_file: Callable[[], Path]
    left: int = MEMORY_REQUEST_LIMIT

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True

    def give_back(self, size: int) -> None:
        self.left += size


class MultipartSpooler:
    """Feeds a streamed multipart body into one :class:`SpooledPart` per part (memory or spool file, bounded)."""

    def __init__(self, boundary: str, new_file: Callable[[], Path], max_part_size: int) -> None:
        self.parts: list[SpooledPart] = []
        self._boundary = boundary.encode("latin-1")
        self._budget = MemoryBudget(new_file)
        self._max = max_part_size
        self._current: SpooledPart | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=32,
            max_header_size=16384,
        )

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self._current = SpooledPart(self._headers.get("content-type"), self._budget, self._max)
        self.parts.append(self._current)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def _end(self) -> None:
        self._ended = True

    async def consume(self, stream: AsyncIterator[bytes]) -> list[SpooledPart]:
        preamble = _PreambleSkipper(self._delimiter)
        try:
            async for chunk in stream:
                data = preamble.feed(chunk) if not preamble.done else chunk
                if data:
                    self._parser.write(data)
            if not preamble.done:
                raise InvalidRequest(
                    "The multipart request body is malformed: "
                    f"it has no boundary delimiter line '{self._delimiter.decode('latin-1')}'."
                )
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(f"The multipart request body is malformed: {exc}") from None
        finally:
            self._part_end()
        if not self._ended:
            raise InvalidRequest("The multipart request body is malformed: it ends before the closing boundary.")
        return self.parts

    @property
    def _delimiter(self) -> bytes:
        return b"--" + self._boundary


class _PreambleSkipper:
    """Drops the RFC 2046 preamble: anything before the first delimiter line (``--boundary`` at a line start)."""

    MAX_PREAMBLE = 64 * 1024

    def __init__(self, delimiter: bytes) -> None:
        self._delimiter = delimiter
        self._buffer = bytearray()
        self._seen = 0
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        self._buffer.extend(chunk)
        if self._buffer.startswith(self._delimiter) and self._seen == 0:
            return self._finish(0)
        at = self._buffer.find(b"\r\n" + self._delimiter)
        if at >= 0:
            return self._finish(at + 2)
        if self._seen == 0 and len(self._buffer) < len(self._delimiter) and self._delimiter.startswith(self._buffer):
            return b""  # too short to decide yet
        keep = len(self._delimiter) + 1
        if len(self._buffer) > keep:
            self._seen += len(self._buffer) - keep
            del self._buffer[:-keep]
        if self._seen > self.MAX_PREAMBLE:
            raise InvalidRequest(
                "The multipart request body is malformed: no boundary delimiter line "
                f"'{self._delimiter.decode('latin-1')}' in its first {self.MAX_PREAMBLE} bytes."
            )
        return b""

    def _finish(self, start: int) -> bytes:
        self.done = True
        data = bytes(self._buffer[start:])
        self._buffer.clear()
        return data


def stow_boundary(content_type: str | None) -> str | None:
    """Validates a STOW Content-Type; returns the multipart boundary, or ``None`` for single-part application/dicom."""
    if not content_type:
        raise UnsupportedMediaType("The request must have a Content-Type of multipart/related or application/dicom.")
    if content_type.strip().lower() == DICOM:
        return None
    media = parse_media_type(content_type)
    if media.type != MULTIPART_RELATED:
        raise UnsupportedMediaType(f"The content type '{content_type}' is not supported.")
    if "start" in media.params:
        raise InvalidRequest("The start parameter in multipart/related request is not supported.")
    boundary = media.params.get("boundary")
    if not boundary:
        raise UnsupportedMediaType("The multipart/related content type has no boundary parameter.")
    if not _BOUNDARY.fullmatch(boundary):
        raise InvalidRequest(
            f"The multipart boundary '{boundary}' is invalid: it must be 1 to {MAX_BOUNDARY_LENGTH} printable ASCII "
            "characters, "
            "without quotes or backslashes, not ending with a space (RFC 2046)."
        )
    related = media.related_type
    if related is not None and related != DICOM:
        raise UnsupportedMediaType(f"The multipart type '{related}' is not supported; use '{DICOM}'.")
    return boundary
