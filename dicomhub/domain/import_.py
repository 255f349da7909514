"""Server-side import: every object under a prefix of an S3 bucket, an Azure blob container or an allow-listed
folder goes through the normal store path (validation; an instance already there is a duplicate, not an error).

Planning lists the prefix and cuts the object names into tasks of ``BATCH_SIZE``; a task downloads its objects
(small ones into memory, others into spool files) and stores them as one STOW request would. A task cut short by a
crash runs again: what it stored already is refused by the index's unique key (45070), so nothing is stored twice;
those objects are then counted as duplicates. The operation succeeds even when some objects failed: each failed
object is listed with its reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import obstore

from dicomhub.blobs.base import Staged
from dicomhub.blobs.object_store import ObjectStore
from dicomhub.config import Settings
from dicomhub.domain.errors import InvalidRequest
from dicomhub.domain.locations import field, open_location, parse_location
from dicomhub.domain.operations import Operation, OperationService, OperationStatus, OperationType, TaskLease
from dicomhub.domain.store import INSTANCE_EXISTS, StoreResult, StoreService
from dicomhub.index.records import Partition
from dicomhub.index.repository import Index

BATCH_SIZE = 32  # objects per task: one store batch, and the work a crashed worker redoes
IN_MEMORY_OBJECT = 1024 * 1024  # larger objects are downloaded to a spool file
API_VERSION = 2  # lenient validation, as `dicomhub import`


def parse_import_request(document: Any, settings: Settings) -> dict[str, Any]:
    """The operation's parameters; 400 on a missing or unknown source, or an unreachable bucket or container."""
    if not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    source = parse_location(field(document, "source"), "source")
    open_location(source, settings)
    return {"source": source}


def start_import(operations: OperationService, partition: Partition, parameters: dict[str, Any]) -> Operation:
    return operations.start(
        OperationType.IMPORT, {**parameters, "partition_key": partition.key, "partition": partition.name}, []
    )


def list_objects(store: ObjectStore) -> Iterator[tuple[str, int]]:
    """(name, size) of every object of the store (under its prefix), in the store's order."""
    for page in obstore.list(store, chunk_size=1000):
        for meta in page:
            yield meta["path"], meta["size"]


def fetch(store: ObjectStore, name: str, size: int, new_spool_file) -> Staged:
    """An object as a staged upload: in memory when small, else streamed into a spool file."""
    if size <= IN_MEMORY_OBJECT:
        return Staged(data=bytearray(bytes(obstore.get(store, name).bytes())))
    staged = Staged(path=new_spool_file())
    with open(staged.path, "wb") as out:
        for piece in obstore.get(store, name).stream(min_chunk_size=1 << 20):
            out.write(piece)
    return staged


def failure_reason(result: StoreResult) -> str:
    text = f"{result.failure}: {result.detail}"
    if result.comments:
        text += " (" + "; ".join(result.comments) + ")"
    return text


class ImportHandler:
    type = OperationType.IMPORT

    def __init__(self, index: Index, store: StoreService, settings: Settings) -> None:
        self.index = index
        self.store = store
        self.settings = settings

    def plan(self, operation: Operation) -> list[dict[str, Any]]:
        source = open_location(operation.parameters["source"], self.settings)
        names = [[name, size] for name, size in list_objects(source.store)]
        return [{"objects": names[i : i + BATCH_SIZE]} for i in range(0, len(names), BATCH_SIZE)] or [{"objects": []}]

    def run_task(self, operation: Operation, payload: dict[str, Any], lease: TaskLease) -> dict[str, Any]:
        source = open_location(operation.parameters["source"], self.settings)
        partition = self.index.ensure_partition(operation.parameters["partition"])
        counts = {"stored": 0, "duplicates": 0, "failed": 0}
        failures: list[dict[str, str]] = []
        staged: list[Staged] = []
        names: list[str] = []
        for name, size in payload["objects"]:
            try:
                staged.append(fetch(source.store, name, size, self.store.blobs.new_staging_file))
                names.append(name)
            except FileNotFoundError:
                counts["failed"] += 1
                failures.append({"name": name, "reason": "the object no longer exists"})
        if not lease.keep():
            for item in staged:
                self.store.blobs.discard(item)
            raise RuntimeError("the task's lease was lost")
        for name, result in zip(names, self.store.store_many(partition, staged, API_VERSION, None), strict=True):
            if result.stored:
                counts["stored"] += 1
            elif result.failure == INSTANCE_EXISTS:
                counts["duplicates"] += 1
            else:
                counts["failed"] += 1
                failures.append({"name": name, "reason": failure_reason(result)})
        return {**counts, "failures": failures}

    def finish(self, operation: Operation, results: list[dict[str, Any]]) -> tuple[OperationStatus, dict | None]:
        summary: dict[str, Any] = {key: sum(r[key] for r in results) for key in ("stored", "duplicates", "failed")}
        summary["failures"] = [f for r in results for f in r["failures"]]
        return OperationStatus.SUCCEEDED, summary
