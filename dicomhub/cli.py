"""The ``dicomhub`` command: serve, migrate, import."""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicomhub.config import DEFAULT_PARTITION, Settings

app = typer.Typer(help="dicomhub: a DICOMweb archive.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8080, help="TCP port."),
    workers: int = typer.Option(1, help="Worker processes (PostgreSQL index only; SQLite needs one)."),
) -> None:
    """Run the DICOMweb server."""
    import uvicorn

    from dicomhub.index.engine import migrate
    from dicomhub.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.index_url)
    if workers > 1 and settings.index_url.startswith("sqlite"):
        raise typer.BadParameter("several workers need a PostgreSQL index (DICOMHUB_DATABASE_URL)")
    uvicorn.run(
        "dicomhub.asgi:app",
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        timeout_keep_alive=30,
    )


@app.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the index schema."""
    from dicomhub.index.engine import migrate

    settings = Settings()
    migrate(settings.index_url)
    console.print(f"index at revision head: {settings.index_url.split('@')[-1]}")


def _dicom_sources(paths: list[Path], staging: Path) -> Iterator[tuple[str, Path]]:
    """Yields (display name, file) for every file under the paths; zip members are extracted one at a time."""
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if zipfile.is_zipfile(file):
                with zipfile.ZipFile(file) as archive:
                    for member in archive.infolist():
                        if member.is_dir():
                            continue
                        target = staging / f"zip-{member.filename.replace('/', '_')}"
                        with archive.open(member) as src, open(target, "wb") as dst:
                            while chunk := src.read(1 << 20):
                                dst.write(chunk)
                        yield f"{file}!{member.filename}", target
            else:
                yield str(file), file


@app.command("import")
def import_command(
    paths: list[Path] = typer.Argument(..., exists=True, help="Files, folders (recursive) or zip archives."),
    partition: str = typer.Option(DEFAULT_PARTITION, help="Data partition to store into."),
    api_version: int = typer.Option(2, help="Validation rules: 1 (strict) or 2 (lenient)."),
) -> None:
    """Load DICOM files through the same store path as STOW-RS, with a progress bar and a summary."""
    import shutil

    from dicomhub.domain.store import INSTANCE_EXISTS
    from dicomhub.services import build_services

    services = build_services(Settings())
    target = services.index.ensure_partition(partition)
    total = sum(1 for p in paths for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    outcome: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    staging = services.blobs.new_staging_file().parent
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("importing", total=total)
        for name, file in _dicom_sources(paths, staging):
            staged = services.blobs.new_staging_file()
            if file.parent == staging:
                file.rename(staged)
            else:
                shutil.copyfile(file, staged)
            result = services.store.store(target, staged, api_version, None)
            if result.stored:
                outcome["stored"] += 1
            elif result.failure == INSTANCE_EXISTS:
                outcome["duplicates"] += 1
            else:
                outcome["failed"] += 1
                failures.append((name, f"{result.failure}: {result.detail}"))
            if not name.count("!"):
                progress.advance(task)
    table = Table(title="import summary")
    for column in ("stored", "duplicates", "failed"):
        table.add_column(column, justify="right")
    table.add_row(*(str(outcome[c]) for c in ("stored", "duplicates", "failed")))
    console.print(table)
    for name, reason in failures[:50]:
        console.print(f"[red]failed[/red] {name}: {reason}")
    if len(failures) > 50:
        console.print(f"... and {len(failures) - 50} more failures")
    raise typer.Exit(code=1 if outcome["failed"] and not outcome["stored"] else 0)


if __name__ == "__main__":
    app()
