"""Wiring: builds the storage backends and domain services from settings, once per process."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pydicom.config

from dicomhub.blobs.base import BlobStore
from dicomhub.blobs.filesystem import FileSystemBlobStore
from dicomhub.blobs.object_store import ObjectBlobStore, StoreConfigurationError, check_reachable, store_from_url
from dicomhub.config import DEFAULT_PARTITION, Settings
from dicomhub.domain.bulk_update import BulkUpdateHandler
from dicomhub.domain.bulkdata import BulkdataService
from dicomhub.domain.cleanup import CleanupService
from dicomhub.domain.decoding import DecodeLimiter
from dicomhub.domain.delete import DeleteService
from dicomhub.domain.export import ExportHandler
from dicomhub.domain.extended_tags import ExtendedTagService, ReindexHandler
from dicomhub.domain.import_ import ImportHandler
from dicomhub.domain.operations import OperationHandler, OperationService, OperationWorker
from dicomhub.domain.query import QueryService
from dicomhub.domain.render import RenderService, ThumbnailCache
from dicomhub.domain.retrieve import RetrieveService
from dicomhub.domain.store import StoreService
from dicomhub.domain.workitems import WorkitemService
from dicomhub.index.cast import IndexCastState
from dicomhub.index.commitments import CommitmentStore
from dicomhub.index.engine import make_engine, migrate
from dicomhub.index.extended_tags import ExtendedTagStore
from dicomhub.index.operations import OperationStore
from dicomhub.index.repository import Index
from dicomhub.index.workitems import WorkitemStore

# Stored files are kept byte for byte; invalid values are reported by our validation, not by pydicom warnings.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


class ConfigurationError(RuntimeError):
    """The settings contradict the stored data; the process must not start."""


@dataclass
class Services:
    settings: Settings
    index: Index
    blobs: BlobStore
    decoding: DecodeLimiter
    store: StoreService
    retrieve: RetrieveService
    query: QueryService
    render: RenderService
    delete: DeleteService
    cleanup: CleanupService
    operations: OperationService
    operation_handlers: list[OperationHandler]

    @cached_property
    def bulkdata(self) -> BulkdataService:
        """Built on first use from the retrieve service it reads through."""
        return BulkdataService(self.blobs, self.retrieve, self.settings)

    @cached_property
    def extended_tags(self) -> ExtendedTagService:
        return ExtendedTagService(ExtendedTagStore(self.index.engine), self.operations, self.settings)

    @cached_property
    def workitems(self) -> WorkitemService:
        return WorkitemService(WorkitemStore(self.index.engine))

    @cached_property
    def storage_commitments(self) -> CommitmentStore:
        """DIMSE storage commitment requests waiting for their report."""
        return CommitmentStore(self.index.engine)

    def cast_state(self, name: str, lease_seconds: float) -> IndexCastState:
        """The durable cursor, lease and failures of the DICOMcast named ``name``."""
        return IndexCastState(self.index.engine, name, lease_seconds)

    def operation_worker(self) -> OperationWorker:
        return OperationWorker(self.operations.store, self.operation_handlers, self.settings)

    @property
    def embedded(self) -> bool:
        """True for the single-process SQLite mode."""
        return self.index.dialect == "sqlite"


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store ``DICOMHUB_BLOB_URL`` names, checked now: a typo, missing credentials or an unreachable
    store stop start-up instead of falling back to the local disk."""
    url = settings.blob_url
    if not url:
        return FileSystemBlobStore(settings.blob_dir, fsync=settings.fsync)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigurationError(f"DICOMHUB_BLOB_URL '{url}' is not a file:///absolute/path URL.")
        return FileSystemBlobStore(Path(unquote(parts.path)), fsync=settings.fsync)
    try:
        store = store_from_url(url, settings.blob_allow_http)
        check_reachable(store, f"The blob store {url}")
    except StoreConfigurationError as exc:
        raise ConfigurationError(f"DICOMHUB_BLOB_URL: {exc}") from None
    return ObjectBlobStore(store, url, settings.data_dir / "staging")


def build_services(settings: Settings, run_migrations: bool = True) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if run_migrations:
        migrate(settings.index_url)
    index = Index(make_engine(settings.index_url))
    if not settings.enable_partitions:
        used = [p.name for p in index.list_partitions() if p.name != DEFAULT_PARTITION]
        if used:
            raise ConfigurationError(
                f"Data partitions are in use ({', '.join(used[:5])}); they cannot be disabled: "
                "set DICOMHUB_ENABLE_PARTITIONS=true."
            )
    blobs = open_blob_store(settings)
    decoding = DecodeLimiter(settings)
    operations = OperationService(OperationStore(index.engine))
    handlers: list[OperationHandler] = [ReindexHandler(ExtendedTagStore(index.engine), settings)]
    store = StoreService(index, blobs, settings)
    handlers.append(BulkUpdateHandler(index, blobs, settings))
    handlers.append(ExportHandler(index, blobs, settings))
    handlers.append(ImportHandler(index, store, settings))
    retrieve = RetrieveService(index, blobs, settings, decoding)
    return Services(
        settings=settings,
        index=index,
        blobs=blobs,
        decoding=decoding,
        store=store,
        retrieve=retrieve,
        query=QueryService(index),
        render=RenderService(
            retrieve, blobs, decoding, ThumbnailCache(settings.data_dir / "thumbnails", settings.thumbnail_cache_size)
        ),
        delete=DeleteService(index, settings),
        cleanup=CleanupService(index, blobs, settings),
        operations=operations,
        operation_handlers=handlers,
    )
