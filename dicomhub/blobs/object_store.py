"""Blobs in an object store (S3 or Azure Blob) through obstore, and the locations export and import use.

obstore (Rust's object_store) does the protocol: SigV4 / SharedKey / SAS signing, multipart uploads whose parts are
read from the spool file a chunk at a time, range reads, listing and retries, on one kept-alive connection pool per
store. This module only turns dicomhub's URLs and the standard credential variables into stores, and the stores
into the :class:`~dicomhub.blobs.base.BlobStore` promise: ``put`` returns once the object is committed.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import obstore
from obstore.store import AzureStore, LocalStore, S3Store

from dicomhub.blobs.base import LocalStaging, Staged

# Parts of a multipart upload: read from the spool file one at a time per concurrent upload, so memory stays near
# UPLOAD_PART_SIZE x UPLOAD_CONCURRENCY whatever the file's size.
UPLOAD_PART_SIZE = 5 * 1024 * 1024
UPLOAD_CONCURRENCY = 3
# A reader fetches at least this much per range request (a DICOM header is usually one request).
READ_BUFFER = 256 * 1024
CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "300s", "pool_idle_timeout": "90s"}
LOOPBACK_NAMES = {"localhost"}

ObjectStore = S3Store | AzureStore | LocalStore


class StoreConfigurationError(ValueError):
    """A storage URL or its credentials cannot work; the message says which."""


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _client_options(endpoint: str | None, allow_http: bool) -> dict[str, Any]:
    """Plain http is refused unless the endpoint is on loopback or the operator allowed it."""
    options: dict[str, Any] = dict(CLIENT_OPTIONS)
    if endpoint and urlsplit(endpoint).scheme == "http":
        if not (allow_http or _is_loopback(urlsplit(endpoint).hostname)):
            raise StoreConfigurationError(
                f"The endpoint {endpoint} is plain http on a non-loopback host; use https or set "
                "DICOMHUB_BLOB_ALLOW_HTTP=true."
            )
        options["allow_http"] = True
    return options


def _split_bucket(url: str, scheme: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.netloc:
        raise StoreConfigurationError(f"'{url}' is not a {scheme}:// URL with a bucket or container name.")
    prefix = parts.path.strip("/") or None
    return parts.netloc, prefix


def s3_store(bucket: str, prefix: str | None, allow_http: bool, env: Mapping[str, str] = os.environ) -> S3Store:
    """A bucket through the standard AWS variables (``AWS_ENDPOINT_URL`` reaches any S3-compatible store)."""
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    config: dict[str, Any] = {"region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        config["endpoint"] = endpoint
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        config["access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        config["secret_access_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            config["session_token"] = env["AWS_SESSION_TOKEN"]
    elif not (env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")):
        raise StoreConfigurationError(
            f"No S3 credentials for bucket '{bucket}': set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or run with a web identity or container role)."
        )
    return S3Store(bucket, prefix=prefix, config=config, client_options=_client_options(endpoint, allow_http))


def parse_connection_string(text: str) -> dict[str, str]:
    """An Azure Storage connection string (``Key=Value;...``) as a dict; values may hold '='."""
    fields = {}
    for item in text.split(";"):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise StoreConfigurationError("The Azure connection string is malformed: expected Key=Value pairs.")
            fields[key.strip()] = value.strip()
    return fields


def azure_connection_string_store(container: str, prefix: str | None, text: str, allow_http: bool) -> AzureStore:
    fields = parse_connection_string(text)
    if fields.get("UseDevelopmentStorage", "").lower() == "true":
        fields.setdefault("BlobEndpoint", "http://127.0.0.1:10000/devstoreaccount1")
        fields.setdefault("AccountName", "devstoreaccount1")
    account = fields.get("AccountName")
    endpoint = fields.get("BlobEndpoint")
    if not endpoint and account:
        protocol = fields.get("DefaultEndpointsProtocol", "https")
        endpoint = f"{protocol}://{account}.blob.{fields.get('EndpointSuffix', 'core.windows.net')}"
    if not endpoint:
        raise StoreConfigurationError("The Azure connection string names neither AccountName nor BlobEndpoint.")
    account = account or _account_of_endpoint(endpoint)
    config: dict[str, Any] = {"account_name": account, "endpoint": endpoint.rstrip("/")}
    if fields.get("AccountKey"):
        config["account_key"] = fields["AccountKey"]
    elif fields.get("SharedAccessSignature"):
        config["sas_key"] = fields["SharedAccessSignature"].lstrip("?")
    else:
        raise StoreConfigurationError("The Azure connection string has neither AccountKey nor SharedAccessSignature.")
    return AzureStore(container, prefix=prefix, config=config, client_options=_client_options(endpoint, allow_http))


def _account_of_endpoint(endpoint: str) -> str:
    """The account of an account URL: the first path segment on an emulator (an address), else the first label."""
    parts = urlsplit(endpoint)
    if _is_address(parts.hostname or ""):
        return parts.path.strip("/").split("/")[0]
    return (parts.hostname or "").split(".")[0]


def azure_container_uri_store(uri: str, prefix: str | None, allow_http: bool) -> AzureStore:
    """A container from its URL, with a SAS in the query when the container is not public: Azure's
    ``https://{account}.blob.core.windows.net/{container}?sv=...``, or an emulator's path-style
    ``http://127.0.0.1:10000/{account}/{container}?sv=...``."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreConfigurationError("The blob container URI must be an http(s) URL.")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    path_style = _is_address(parts.hostname)
    if len(segments) != (2 if path_style else 1):
        raise StoreConfigurationError("The blob container URI must name exactly one container.")
    account = segments[0] if path_style else parts.hostname.split(".")[0]
    container = segments[-1]
    root = f"{parts.scheme}://{parts.netloc}" + (f"/{account}" if path_style else "")
    config: dict[str, Any] = {"account_name": account, "endpoint": root}
    if parts.query:
        config["sas_key"] = parts.query
    else:
        config["skip_signature"] = True
    return AzureStore(container, prefix=prefix, config=config, client_options=_client_options(root, allow_http))


def azure_store(
    container: str, prefix: str | None, allow_http: bool, env: Mapping[str, str] = os.environ
) -> AzureStore:
    """A container through ``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT_NAME`` with
    ``AZURE_STORAGE_ACCOUNT_KEY`` or ``AZURE_STORAGE_SAS_TOKEN`` (``AZURE_STORAGE_ENDPOINT`` overrides the URL)."""
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return azure_connection_string_store(container, prefix, env["AZURE_STORAGE_CONNECTION_STRING"], allow_http)
    account = env.get("AZURE_STORAGE_ACCOUNT_NAME")
    secret = env.get("AZURE_STORAGE_ACCOUNT_KEY") or env.get("AZURE_STORAGE_SAS_TOKEN")
    if not (account and secret):
        raise StoreConfigurationError(
            f"No Azure credentials for container '{container}': set AZURE_STORAGE_CONNECTION_STRING, or "
            "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN."
        )
    endpoint = env.get("AZURE_STORAGE_ENDPOINT") or f"https://{account}.blob.core.windows.net"
    config: dict[str, Any] = {"account_name": account, "endpoint": endpoint.rstrip("/")}
    if env.get("AZURE_STORAGE_ACCOUNT_KEY"):
        config["account_key"] = env["AZURE_STORAGE_ACCOUNT_KEY"]
    else:
        config["sas_key"] = env["AZURE_STORAGE_SAS_TOKEN"].lstrip("?")
    return AzureStore(container, prefix=prefix, config=config, client_options=_client_options(endpoint, allow_http))


def store_from_url(url: str, allow_http: bool = False, env: Mapping[str, str] = os.environ) -> ObjectStore:
    """``s3://bucket[/prefix]`` or ``azure://container[/prefix]``; any other scheme is an error, never a fallback."""
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        return s3_store(*_split_bucket(url, "s3"), allow_http, env)
    if scheme == "azure":
        return azure_store(*_split_bucket(url, "azure"), allow_http, env)
    raise StoreConfigurationError(f"Unknown storage URL scheme in '{url}': use file://, s3:// or azure://.")


def check_reachable(store: ObjectStore, what: str) -> None:
    """Lists at most one object: fails when the bucket/container is missing, refused or unreachable."""
    try:
        next(iter(obstore.list(store, chunk_size=1)), None)
    except Exception as exc:
        raise StoreConfigurationError(f"{what} cannot be reached: {describe_error(exc)}") from None


def describe_error(exc: Exception) -> str:
    """The first line of an object-store error, with the store's error code when it sent one."""
    text = str(exc)
    for code in ("NoSuchBucket", "ContainerNotFound", "AuthenticationFailed", "AuthorizationFailure",
                 "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):  # fmt: skip
        if code in text:
            return f"{code}: {text.splitlines()[0][:300]}"
    return text.splitlines()[0][:400] if text else type(exc).__name__


def put_file(store: ObjectStore, key: str, source: BinaryIO | bytes | bytearray | memoryview) -> None:
    """Writes ``key`` whole; a file-like source is streamed in parts (multipart upload over UPLOAD_PART_SIZE)."""
    if isinstance(source, bytearray | memoryview):
        source = bytes(source)
    obstore.put(store, key, source, chunk_size=UPLOAD_PART_SIZE, max_concurrency=UPLOAD_CONCURRENCY)


def iter_object(
    store: ObjectStore, key: str, offset: int = 0, length: int | None = None, chunk: int = 1 << 20
) -> Iterator[bytes]:
    """Streams a byte range: one ranged GET read as it arrives, never the whole object in memory."""
    if length == 0:
        return
    if length is not None and length <= chunk:
        yield bytes(obstore.get_range(store, key, start=offset, length=length))
        return
    rng = {"offset": offset} if length is None else (offset, offset + length)
    if length is None and offset == 0:
        result = obstore.get(store, key)
    else:
        result = obstore.get(store, key, options={"range": rng})
    for piece in result.stream(min_chunk_size=chunk):
        yield bytes(piece)


class _RangeReader(io.RawIOBase):
    """A seekable raw reader over one object: every read is a ranged GET (buffered above by BufferedReader)."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self.name = key  # pydicom reads a file object's name
        self._size = obstore.head(store, key)["size"]  # FileNotFoundError when missing, as a file would be
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        end = min(self._position + len(buffer), self._size)
        if end <= self._position:
            return 0
        data = obstore.get_range(self._store, self._key, start=self._position, end=end)
        n = len(data)
        memoryview(buffer)[:n] = memoryview(data)
        self._position += n
        return n


def open_object(store: ObjectStore, key: str) -> BinaryIO:
    return io.BufferedReader(_RangeReader(store, key), buffer_size=READ_BUFFER)


class ObjectBlobStore(LocalStaging):
    """The blob store on S3 or Azure Blob. Large uploads are spooled on the local disk first (``staging``), as on
    the filesystem backend, then uploaded in parts; an upload is acknowledged by the store before ``put`` returns,
    and keys are never reused, so an upload cut short by a crash is at most an orphan (or an incomplete multipart
    upload, which the bucket's lifecycle rule for aborted uploads removes)."""

    def __init__(self, store: ObjectStore, url: str, staging: Path) -> None:
        self.store = store
        self.url = url
        self.staging = staging
        self.staging.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, staged: Staged) -> None:
        if staged.data is not None:
            put_file(self.store, key, staged.data)
        else:
            with open(staged.path, "rb") as f:
                put_file(self.store, key, f)
        self.discard(staged)

    def open(self, key: str) -> BinaryIO:
        return open_object(self.store, key)

    def iter_range(self, key: str, offset: int = 0, length: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
        return iter_object(self.store, key, offset, length, chunk)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # Azure answers 404 for a missing blob; S3 does not
            obstore.delete(self.store, key)

    def health(self) -> None:
        """Writes, reads back and deletes a small probe object under the store's prefix."""
        key = f".health/{uuid.uuid4().hex}"
        obstore.put(self.store, key, b"ok")
        try:
            if bytes(obstore.get(self.store, key).bytes()) != b"ok":
                raise OSError(f"the probe object read back from {self.url} differs")
        finally:
            self.delete(key)
