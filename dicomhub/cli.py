"""The ``dicomhub`` command: serve, worker, migrate, import, sample, dimse."""

from __future__ import annotations

import logging
import os
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicomhub.config import DEFAULT_PARTITION, Settings
from dicomhub.dimse.commands import dimse_app, start_dimse

app = typer.Typer(help="dicomhub: a DICOMweb archive.", no_args_is_help=True, add_completion=False)
app.add_typer(dimse_app, name="dimse")
console = Console(stderr=True)
log = logging.getLogger("dicomhub.cli")


def _build_services(settings: Settings):
    """The services, or exit 2 with the reason when the settings cannot work (a blob store URL with a typo, missing
    credentials or an unreachable store, partitions in use but disabled)."""
    from dicomhub.services import ConfigurationError, build_services

    try:
        return build_services(settings)
    except ConfigurationError as exc:
        console.print(f"[red]cannot start:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8080, help="TCP port."),
    workers: int | None = typer.Option(None, help="Worker processes (default: DICOMHUB_WORKERS)."),
) -> None:
    """Run the DICOMweb server."""
    import shutil
    import socket
    from datetime import UTC, datetime

    import uvicorn

    from dicomhub.logs import configure_logging

    settings = Settings()
    log_config = configure_logging(settings.log_level, settings.log_json)
    workers = workers or settings.workers
    # Once, before any worker accepts a request: migrate, check the settings against the data, and (embedded
    # mode: no other process can be storing now) roll back stores a crash left unfinished.
    services = _build_services(settings)
    if services.embedded:
        rolled_back = services.cleanup.rollback_unfinished_stores(datetime.now(UTC))
        if rolled_back:
            log.warning("rolled back unfinished stores left by a crash", extra={"stores": rolled_back})
        resumed = services.operations.store.release_all_leases()
        if resumed:
            log.warning("resuming operation tasks left by a crash", extra={"tasks": resumed})
    services.index.engine.dispose()
    if settings.cast_enabled and not settings.cast_dicomweb_url:  # the cast names this server in FHIR
        public_host = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        os.environ["DICOMHUB_CAST_DICOMWEB_URL"] = f"http://{public_host}:{port}/v2"
    if workers > 1:  # Prometheus counters shared by the worker processes through files
        metrics_dir = settings.data_dir / ".metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # The DIMSE listener runs in this parent process (uvicorn's supervisor when workers > 1): bound once
    dimse = start_dimse(settings) if settings.dimse_enabled else None
    try:
        uvicorn.run(
            "dicomhub.asgi:app",
            host=host,
            port=port,
            workers=workers,
            log_config=log_config,  # applied again in each worker process (spawned: it inherits no handlers)
            access_log=False,
            timeout_keep_alive=30,
        )
    finally:
        if dimse is not None:
            dimse.shutdown()


@app.command()
def worker() -> None:
    """Run long-running operations (re-index, bulk update) in this process until interrupted.

    Any number of workers may run beside the servers (set DICOMHUB_RUN_OPERATIONS=false on the servers to keep
    them out of it); they share the work through the index.
    """
    import signal
    import threading

    from dicomhub.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    services = _build_services(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log.info("operation worker started")
    services.operation_worker().run(stop)


@app.command()
def cast(
    dicomweb_url: str | None = typer.Option(
        None,
        "--dicomweb-url",
        help="Follow this DICOMweb archive's change feed (any serving Azure's routes) instead of the local index; "
        "its state is kept in DICOMHUB_CAST_STATE_FILE.",
    ),
    status: bool = typer.Option(False, "--status", help="Print the cursor, the lag and the failed entries as JSON."),
) -> None:
    """DICOMcast: keep the FHIR server at DICOMHUB_CAST_FHIR_URL in step with the archive's change feed.

    Runs in the foreground until interrupted (SIGINT/SIGTERM). Following the local archive, it shares
    DICOMHUB_DATA_DIR / DICOMHUB_DATABASE_URL with `dicomhub serve`; one cast runs at a time (a lease).
    """
    import json
    import signal
    import threading

    from dicomhub.cast.runner import build_runner
    from dicomhub.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    try:
        runner = build_runner(settings, dicomweb_url)
    except ValueError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    if status:
        typer.echo(json.dumps(runner.status(), indent=2))
        return
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log.info("DICOMcast started", extra={"fhir": settings.cast_fhir_url, "archive": dicomweb_url or "local index"})
    runner.run(stop)


@app.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the index schema."""
    from dicomhub.index.engine import migrate

    settings = Settings()
    migrate(settings.index_url)
    console.print(f"index at revision head: {settings.index_url.split('@')[-1]}")


@app.command()
def sample(path: Path = typer.Argument(Path("sample.dcm"), help="File to write.")) -> None:
    """Write a small DICOM file to try the server with and print its StudyInstanceUID.

    It is pydicom's bundled CT_small.dcm (128 x 128 CT, patient CompressedSamples^CT1) with new Study, Series and SOP
    Instance UIDs, so every file written can be stored.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid(prefix=None)
    ds.SeriesInstanceUID = generate_uid(prefix=None)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
    ds.save_as(path, enforce_file_format=True)
    typer.echo(ds.StudyInstanceUID)


@dataclass
class _Source:
    """One file to import: ``path`` is ``None`` when it could not even be read (``error`` says why)."""

    name: str
    path: Path | None
    extracted: bool = False
    error: str | None = None


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _dicom_sources(paths: list[Path], staging: Path) -> Iterator[tuple[_Source, bool]]:
    """Yields (source, last of its file) for every file under the paths; zip members are extracted one at a time.

    A damaged archive (bad CRC, truncated member, encryption) fails only the members it cannot give.
    """
    for path in paths:
        for file in _files(path):
            if not zipfile.is_zipfile(file):
                yield _Source(str(file), file), True
                continue
            try:
                archive = zipfile.ZipFile(file)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                yield _Source(str(file), None, error=f"the zip archive could not be opened: {exc}"), True
                continue
            with archive:
                members = [m for m in archive.infolist() if not m.is_dir()]
                if not members:
                    yield _Source(str(file), None, error="the zip archive has no files"), True
                for number, member in enumerate(members, start=1):
                    name = f"{file}!{member.filename}"
                    target = staging / f"zip-{uuid.uuid4().hex}.part"
                    try:
                        with archive.open(member) as src, open(target, "wb") as dst:
                            while chunk := src.read(1 << 20):
                                dst.write(chunk)
                    except Exception as exc:  # bad CRC, truncated or encrypted member: fails this member only
                        target.unlink(missing_ok=True)
                        yield (
                            _Source(name, None, error=f"the zip member could not be extracted: {exc}"),
                            (number == len(members)),
                        )
                        continue
                    yield _Source(name, target, extracted=True), number == len(members)


@app.command("import")
def import_command(
    sources: list[str] = typer.Argument(
        ..., help="Files, folders (recursive), zip archives, or s3://bucket/prefix and azure://container/prefix."
    ),
    partition: str = typer.Option(DEFAULT_PARTITION, help="Data partition to store into."),
    api_version: int = typer.Option(2, min=1, max=2, help="Validation rules: 1 (strict) or 2 (lenient)."),
) -> None:
    """Load DICOM files through the same store path as STOW-RS, with a progress bar and a summary.

    Object-store prefixes use the AWS_* / AZURE_STORAGE_* variables, as DICOMHUB_BLOB_URL does.
    Exit code 1 when files failed and none was stored or already there (nothing useful happened), else 0.
    """
    import shutil

    from dicomhub.blobs.base import Staged
    from dicomhub.blobs.object_store import StoreConfigurationError, store_from_url
    from dicomhub.domain.import_ import failure_reason, fetch, list_objects
    from dicomhub.domain.store import INSTANCE_EXISTS

    settings = Settings()
    urls = [s for s in sources if s.startswith(("s3://", "azure://"))]
    paths = [Path(s) for s in sources if s not in urls]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]not found:[/red] {escape(', '.join(missing))}", highlight=False)
        raise typer.Exit(code=2)
    try:
        listings = [(url, store, list(list_objects(store))) for url in urls for store in [store_from_url(url)]]
    except (StoreConfigurationError, OSError) as exc:
        console.print(f"[red]cannot read the object store:[/red] {escape(str(exc).splitlines()[0])}", highlight=False)
        raise typer.Exit(code=2) from None
    services = _build_services(settings)
    target = services.index.ensure_partition(partition)
    total = sum(len(_files(p)) for p in paths) + sum(len(objects) for _, _, objects in listings)
    outcome: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    staging = services.blobs.new_staging_file().parent

    def store_one(name: str, staged: Staged) -> None:
        result = services.store.store(target, staged, api_version, None)
        if result.stored:
            outcome["stored"] += 1
            if result.warning is not None:
                outcome["warnings"] += 1
        elif result.failure == INSTANCE_EXISTS:
            outcome["duplicates"] += 1
        else:
            outcome["failed"] += 1
            failures.append((name, failure_reason(result)))

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("importing", total=total)
        for source, last in _dicom_sources(paths, staging):
            if source.path is None:
                outcome["failed"] += 1
                failures.append((source.name, source.error or "unreadable"))
            else:
                staged = Staged(services.blobs.new_staging_file())
                try:
                    if source.extracted:
                        source.path.rename(staged.path)
                    else:
                        shutil.copyfile(source.path, staged.path)
                except OSError as exc:
                    services.blobs.discard(staged)
                    outcome["failed"] += 1
                    failures.append((source.name, f"the file could not be read: {exc}"))
                else:
                    store_one(source.name, staged)
            if last:
                progress.advance(task)
        for url, store, objects in listings:
            for name, size in objects:
                try:
                    staged = fetch(store, name, size, services.blobs.new_staging_file)
                except OSError as exc:
                    outcome["failed"] += 1
                    failures.append((f"{url}/{name}", f"the object could not be read: {exc}"))
                else:
                    store_one(name, staged)
                progress.advance(task)
    table = Table(title="import summary")
    for column in ("stored", "duplicates", "failed"):
        table.add_column(column, justify="right")
    table.add_row(*(str(outcome[c]) for c in ("stored", "duplicates", "failed")))
    console.print(table)
    for name, reason in failures[:50]:
        console.print(f"[red]failed[/red] {escape(name)}: {escape(reason)}", highlight=False, soft_wrap=True)
    if len(failures) > 50:
        console.print(f"... and {len(failures) - 50} more failures")
    summary = (
        f"imported: {outcome['stored']} stored ({outcome['warnings']} with warnings), "
        f"{outcome['duplicates']} duplicates, {outcome['failed']} failed"
    )
    console.print(summary, highlight=False, soft_wrap=True)
    raise typer.Exit(code=1 if outcome["failed"] and not (outcome["stored"] or outcome["duplicates"]) else 0)


if __name__ == "__main__":
    app()
