"""Per-request context: API version and data partition from the path, and the services of the app."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import HTTPException, Request

from dicomhub.config import DEFAULT_PARTITION
from dicomhub.dicom.uids import INVALID_UID_MESSAGE, is_valid_uid
from dicomhub.domain.errors import InvalidRequest
from dicomhub.index.records import Partition
from dicomhub.services import Services

VERSIONS = {"1.0-prerelease": 1, "1": 1, "2": 2}
_PARTITION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class RequestContext:
    request: Request
    services: Services
    api_version: int
    partition_name: str

    def partition(self) -> Partition:
        """The addressed partition; it must exist (only STOW creates partitions)."""
        found = self.services.index.get_partition(self.partition_name)
        if found is None:
            raise InvalidRequest("Specified PartitionName does not exist.")
        return found

    def partition_for_store(self) -> Partition:
        return self.services.index.ensure_partition(self.partition_name)

    def base_url(self) -> str:
        """``{scheme}://{host}/v{n}[/partitions/{p}]`` as the client addressed it."""
        path = self.request.url.path
        marker = "/studies"
        # the last "/studies": a partition may itself be named "studies" (UIDs never contain a "/")
        prefix = path[: path.rfind(marker)] if marker in path else path.rstrip("/")
        return f"{self.request.url.scheme}://{self.request.url.netloc}{prefix}"


def version_of(request: Request) -> int:
    version = VERSIONS.get(request.path_params.get("version", ""))
    if version is None:
        raise HTTPException(status_code=404, detail="Unsupported API version.")
    return version


async def studies_context(request: Request) -> RequestContext:
    """Dependency of every Studies route (plain and partitioned)."""
    services: Services = request.app.state.services
    version = version_of(request)
    name = request.path_params.get("partition_name")
    enabled = services.settings.enable_partitions
    if name is not None and not enabled:
        raise InvalidRequest("Data partitions feature is disabled.")
    if name is None and enabled:
        raise InvalidRequest("PartitionName value is missing in the route segment.")
    if name is not None and not _PARTITION_NAME.fullmatch(name):
        raise InvalidRequest("The specified PartitionName is invalid.")
    return RequestContext(request, services, version, name or DEFAULT_PARTITION)


def check_uid(value: str, name: str) -> str:
    if not is_valid_uid(value):
        raise InvalidRequest(f"The {name} '{value}' is invalid. {INVALID_UID_MESSAGE}")
    return value.rstrip(" \0")
