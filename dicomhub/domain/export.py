"""Export (Azure's operation, spec 5.6): copies studies, series and instances to a blob container, an S3 bucket or
an allow-listed folder, optionally de-identified (PS3.15 Basic profile).

Planning resolves each identifier to its instances (unknown ones are skipped and logged) and cuts them into tasks
of ``BATCH_SIZE``. A task writes each file to ``<operation>/results/<study>/<series>/<sop>.dcm``; a task run twice
(after a crash) writes the same keys with the same bytes, de-identified ones too (their new UIDs derive from the
operation id). The last step writes ``<operation>/errors.log`` (JSON lines ``{timestamp, identifier, error}``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from typing import Any

from dicomhub.blobs.base import MEMORY_PART_LIMIT, BlobStore
from dicomhub.blobs.object_store import describe_error, put_file
from dicomhub.config import Settings
from dicomhub.dicom.deidentify import PROFILES, UidMap, deidentify
from dicomhub.dicom.uids import is_valid_uid
from dicomhub.domain.bulk_update import rewrite
from dicomhub.domain.errors import InvalidRequest
from dicomhub.domain.locations import Location, field, open_location, parse_location
from dicomhub.domain.operations import Operation, OperationService, OperationStatus, OperationType, TaskLease
from dicomhub.index.records import Partition, StoredInstance
from dicomhub.index.repository import Index

log = logging.getLogger(__name__)

BATCH_SIZE = 100  # instances per task (Azure's export batch size)
IDENTIFIERS = "identifiers"
ERRORS_LOG = "errors.log"


def parse_export_request(document: Any, settings: Settings) -> dict[str, Any]:
    """The operation's parameters from Azure's body (plus our ``deidentify``); 400 on anything malformed, and when
    the destination cannot be reached (Azure checks the sink before it starts)."""
    if not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    source = field(document, "source")
    if not isinstance(source, dict):
        raise InvalidRequest("Missing value for property 'Source'.")
    kind = field(source, "type")
    if not isinstance(kind, str) or kind.strip().lower() != IDENTIFIERS:
        raise InvalidRequest(f"The export source type '{kind}' is not supported; use '{IDENTIFIERS}'.")
    values = field(field(source, "settings"), "values")
    if not values:
        raise InvalidRequest("Missing value for property 'Values'.")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidRequest("The property 'Values' must be a list of strings.")
    identifiers = [_identifier(v) for v in values]
    destination = parse_location(field(document, "destination"), "destination")
    profile = _profile(field(document, "deidentify"))
    open_location(destination, settings, create_folder=True)
    return {"identifiers": identifiers, "destination": destination, "deidentify": profile}


def _identifier(value: str) -> list[str]:
    parts = value.strip().split("/")
    if not 1 <= len(parts) <= 3 or not all(is_valid_uid(p) for p in parts):
        raise InvalidRequest(
            f"The export identifier '{value}' is invalid: expected 'study', 'study/series' or 'study/series/instance' "
            "with valid DICOM UIDs."
        )
    return parts


def _profile(option: Any) -> str | None:
    if option is None:
        return None
    profile = field(option, "profile")
    if not isinstance(profile, str) or profile.strip().lower() not in PROFILES:
        raise InvalidRequest(f"The de-identification profile '{profile}' is not supported; use one of: basic.")
    return profile.strip().lower()


def start_export(operations: OperationService, partition: Partition, parameters: dict[str, Any]) -> Operation:
    levels = ("studies", "series", "instances")
    values = ["/".join(f"{lv}/{uid}" for lv, uid in zip(levels, i, strict=False)) for i in parameters["identifiers"]]
    return operations.start(
        OperationType.EXPORT, {**parameters, "partition_key": partition.key, "partition": partition.name}, values
    )


def _error_line(identifier: str, error: str) -> dict[str, str]:
    return {"timestamp": datetime.now(UTC).isoformat(), "identifier": identifier, "error": error}


class ExportHandler:
    type = OperationType.EXPORT

    def __init__(self, index: Index, blobs: BlobStore, settings: Settings) -> None:
        self.index = index
        self.blobs = blobs
        self.settings = settings

    def plan(self, operation: Operation) -> list[dict[str, Any]]:
        partition_key = operation.parameters["partition_key"]
        instances: list[list[str]] = []
        seen: set[tuple[str, ...]] = set()
        missing: list[str] = []
        for identifier in operation.parameters["identifiers"]:
            found = self.index.find_instances(partition_key, *identifier)
            if not found:
                missing.append("/".join(identifier))
            for inst in found:
                key = (inst.study_uid, inst.series_uid, inst.sop_uid)
                if key not in seen:
                    seen.add(key)
                    instances.append(list(key))
        tasks: list[dict[str, Any]] = [
            {"instances": instances[i : i + BATCH_SIZE]} for i in range(0, len(instances), BATCH_SIZE)
        ]
        if missing or not tasks:
            tasks.append({"missing": missing})
        return tasks

    def run_task(self, operation: Operation, payload: dict[str, Any], lease: TaskLease) -> dict[str, Any]:
        errors = [_error_line(i, "The resource was not found.") for i in payload.get("missing", [])]
        skipped = len(errors)
        exported = 0
        if payload.get("instances"):
            destination = open_location(operation.parameters["destination"], self.settings)
            uid_map = UidMap(operation.id) if operation.parameters.get("deidentify") else None
            for study, series, sop in payload["instances"]:
                if not lease.keep():
                    raise RuntimeError("the task's lease was lost")
                identifier = f"{study}/{series}/{sop}"
                found = self.index.find_instances(operation.parameters["partition_key"], study, series, sop)
                if not found:  # deleted since the plan
                    errors.append(_error_line(identifier, "The resource was not found."))
                    skipped += 1
                    continue
                try:
                    self._export(operation.id, found[0], destination, uid_map)
                    exported += 1
                except (ValueError, KeyError, AttributeError, TypeError) as exc:  # a file de-identification refuses
                    errors.append(_error_line(identifier, f"The instance could not be exported: {exc}"))
                    skipped += 1
        return {"exported": exported, "skipped": skipped, "errors": errors}

    def _export(self, operation_id: str, inst: StoredInstance, destination: Location, uid_map: UidMap | None) -> None:
        """Copies the stored file to the destination through a spool (in memory while small): obstore cannot read
        a source that is itself an object-store reader while it uploads. De-identified, the header is rewritten
        and the pixel data copied as it is."""
        uids = (inst.study_uid, inst.series_uid, inst.sop_uid)
        with tempfile.SpooledTemporaryFile(max_size=MEMORY_PART_LIMIT) as spool:
            if uid_map is None:
                for piece in self.blobs.iter_range(inst.blob_key):
                    spool.write(piece)
            else:
                uids = tuple(uid_map(u) for u in uids)
                with self.blobs.open(inst.blob_key) as src:
                    rewrite(src, lambda ds: deidentify(ds, uid_map), spool)
            spool.seek(0)
            put_file(destination.store, result_key(operation_id, *uids), spool)

    def finish(self, operation: Operation, results: list[dict[str, Any]]) -> tuple[OperationStatus, dict | None]:
        destination = open_location(operation.parameters["destination"], self.settings)
        lines = [json.dumps(e, separators=(",", ":")) for r in results for e in r["errors"]]
        errors_key = f"{operation.id}/{ERRORS_LOG}"
        try:
            put_file(destination.store, errors_key, "".join(f"{line}\n" for line in lines).encode())
        except Exception as exc:
            return OperationStatus.FAILED, {"errors": [f"The error log could not be written: {describe_error(exc)}"]}
        return OperationStatus.SUCCEEDED, {
            "exported": sum(r["exported"] for r in results),
            "skipped": sum(r["skipped"] for r in results),
            "errorHref": destination.url_of(errors_key),
        }


def result_key(operation_id: str, study: str, series: str, sop: str) -> str:
    return f"{operation_id}/results/{study}/{series}/{sop}.dcm"
