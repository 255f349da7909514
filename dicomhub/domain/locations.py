"""Where an export writes and an import reads: an Azure blob container, an S3 bucket, or an allow-listed folder.

The request's ``{"type", "settings"}`` object is checked (400 with a message that says what is wrong) and opened as
an obstore store, the same library the blob backends use; the container or bucket must exist, as Azure checks the
sink before an export starts. The object is kept in the operation's parameters, so a worker anywhere can reopen it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from obstore.store import LocalStore

from dicomhub.blobs.object_store import (
    ObjectStore,
    StoreConfigurationError,
    azure_connection_string_store,
    azure_container_uri_store,
    check_reachable,
    parse_connection_string,
    s3_store,
)
from dicomhub.config import Settings
from dicomhub.domain.errors import InvalidRequest

AZURE_BLOB = "azureblob"
S3 = "s3"
FILESYSTEM = "filesystem"
TYPES = (AZURE_BLOB, S3, FILESYSTEM)


def field(obj: Any, name: str) -> Any:
    """A JSON property by name, case-insensitively (Azure's model binder ignores case); None when absent."""
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() == name.lower():
            return value
    return None


def _text(settings: Any, name: str, required: bool = True) -> str | None:
    value = field(settings, name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidRequest(f"Missing value for property '{name}'.")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"The property '{name}' must be a string.")
    return value.strip()


@dataclass(frozen=True)
class Location:
    """An opened location: its store (keys relative to the prefix) and the URL its keys are shown under."""

    store: ObjectStore
    href: str

    def url_of(self, key: str) -> str:
        return f"{self.href.rstrip('/')}/{key}"


def parse_location(document: Any, role: str) -> dict[str, Any]:
    """The ``{"type", "settings"}`` object of a request, checked and normalised for storage; ``role`` is
    'destination' or 'source' (it names the object in messages)."""
    if not isinstance(document, dict):
        raise InvalidRequest(f"Missing value for property '{role.capitalize()}'.")
    kind = field(document, "type")
    if not isinstance(kind, str) or not kind.strip():
        raise InvalidRequest(f"Missing value for property '{role.capitalize()}.Type'.")
    kind = kind.strip().lower()
    if kind not in TYPES:
        raise InvalidRequest(f"The {role} type '{kind}' is not supported; use one of: {', '.join(TYPES)}.")
    settings = field(document, "settings")
    if not isinstance(settings, dict):
        raise InvalidRequest(f"Missing value for property '{role.capitalize()}.Settings'.")
    if kind == AZURE_BLOB:
        uri = _text(settings, "blobContainerUri", required=False)
        connection = _text(settings, "connectionString", required=False)
        container = _text(settings, "blobContainerName", required=False)
        if field(settings, "useManagedIdentity") is True:
            raise InvalidRequest("Managed identities are not supported; use a SAS URI or a connection string.")
        if bool(uri) == bool(connection or container):
            raise InvalidRequest(
                "Specify either 'blobContainerUri' or both 'connectionString' and 'blobContainerName'."
            )
        if not uri and not (connection and container):
            raise InvalidRequest("Both 'connectionString' and 'blobContainerName' are required together.")
        clean = {"blobContainerUri": uri} if uri else {"connectionString": connection, "blobContainerName": container}
    elif kind == S3:
        clean = {"bucket": _text(settings, "bucket")}
    else:
        clean = {"path": _text(settings, "path")}
    prefix = (_text(settings, "prefix", required=False) or "").strip("/")
    if ".." in prefix.split("/"):
        raise InvalidRequest(f"The prefix '{prefix}' must not contain '..'.")
    return {"type": kind, "settings": {**clean, "prefix": prefix}}


def _allowed_folder(path_text: str, roots_setting: str) -> Path:
    """``path_text`` resolved, when it lies inside one of DICOMHUB_EXPORT_ROOTS (no escape by '..' or links)."""
    roots = [Path(r.strip()).resolve() for r in roots_setting.split(",") if r.strip()]
    if not roots:
        raise InvalidRequest("Filesystem locations are disabled: the server has no DICOMHUB_EXPORT_ROOTS.")
    if ".." in Path(path_text).parts:
        raise InvalidRequest(f"The path '{path_text}' must not contain '..'.")
    path = Path(os.path.realpath(path_text))
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise InvalidRequest(f"The path '{path_text}' is outside the folders allowed by DICOMHUB_EXPORT_ROOTS.")
    return path


def open_location(location: dict[str, Any], settings: Settings, create_folder: bool = False) -> Location:
    """The store of a location from :func:`parse_location`; an unreachable one is a 400 that says why."""
    kind, values = location["type"], location["settings"]
    prefix = values["prefix"] or None
    try:
        if kind == AZURE_BLOB:
            if values.get("blobContainerUri"):
                store = azure_container_uri_store(values["blobContainerUri"], prefix, settings.blob_allow_http)
                parts = urlsplit(values["blobContainerUri"])
                href = f"{parts.scheme}://{parts.netloc}{parts.path}"  # the SAS is a secret: never shown
            else:
                container = values["blobContainerName"]
                store = azure_connection_string_store(
                    container, prefix, values["connectionString"], settings.blob_allow_http
                )
                href = f"{_blob_endpoint(values['connectionString'])}/{container}"
            what = "The blob container"
        elif kind == S3:
            store = s3_store(values["bucket"], prefix, settings.blob_allow_http)
            href = f"s3://{values['bucket']}"
            what = f"The bucket '{values['bucket']}'"
        else:
            folder = _allowed_folder(os.path.join(values["path"], values["prefix"]), settings.export_roots)
            if create_folder:
                folder.mkdir(parents=True, exist_ok=True)
            if not folder.is_dir():
                raise InvalidRequest(f"The folder '{values['path']}' does not exist.")
            return Location(LocalStore(folder), folder.as_uri())
        check_reachable(store, what)
    except StoreConfigurationError as exc:
        raise InvalidRequest(str(exc)) from None
    return Location(store, f"{href}/{prefix}" if prefix else href)


def _blob_endpoint(connection_string: str) -> str:
    fields = parse_connection_string(connection_string)
    if fields.get("BlobEndpoint"):
        return fields["BlobEndpoint"].rstrip("/")
    protocol = fields.get("DefaultEndpointsProtocol", "https")
    return f"{protocol}://{fields.get('AccountName')}.blob.{fields.get('EndpointSuffix', 'core.windows.net')}"
