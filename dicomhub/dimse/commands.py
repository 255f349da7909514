"""``dicomhub dimse``: the DIMSE listener in the foreground, and the operator's ``send`` and ``move`` commands.

pynetdicom is imported inside the commands, so the other ``dicomhub`` commands start without it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dicomhub.config import Settings

if TYPE_CHECKING:
    from dicomhub.dimse.server import DimseServer

dimse_app = typer.Typer(
    help="DIMSE gateway: without a sub-command, run the listener in the foreground.",
    invoke_without_command=True,
    add_completion=False,
)
console = Console(stderr=True)
log = logging.getLogger("dicomhub.dimse")


def start_dimse(settings: Settings) -> DimseServer:
    """Builds the services and starts the listener in background threads (``dicomhub serve`` and ``dimse``)."""
    from dicomhub.dimse.server import DimseServer
    from dicomhub.services import build_services

    pynetdicom_level = logging.DEBUG if settings.log_level.lower() == "debug" else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)  # one line per PDU otherwise
    server = DimseServer(build_services(settings, run_migrations=False))
    server.start()
    return server


@dimse_app.callback()
def dimse(ctx: typer.Context) -> None:
    """Run the DIMSE listener (DICOMHUB_DIMSE_HOST/PORT/AET) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    import signal
    import threading

    from dicomhub.index.engine import migrate
    from dicomhub.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    migrate(settings.index_url)
    server = start_dimse(settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("DIMSE listener stopping")
    server.shutdown()


def _address(text: str):
    from dicomhub.dimse.scu import Address

    try:
        return Address.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]


@dimse_app.command()
def send(
    paths: list[Path] = typer.Argument(..., exists=True, help="DICOM files or folders (recursive)."),
    to: str = typer.Option(..., "--to", help="The receiving peer: AE@host:port."),
    aet: str = typer.Option("DICOMHUB", help="Calling AE title."),
) -> None:
    """C-STORE files to a DIMSE peer with a progress bar; exit 1 when any failed."""
    from dicomhub.dimse.scu import ScuError, send_files

    address = _address(to)
    files = _files(paths)
    outcome: Counter[str] = Counter()
    failures: list[str] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task(f"sending to {address.ae_title}", total=len(files))
        try:
            for result in send_files(files, address, aet):
                outcome[result.kind] += 1
                if result.kind == "failed":
                    code = "not sent" if result.status is None else f"0x{result.status:04X}"
                    failures.append(f"{result.path}: {code} {result.detail}".rstrip())
                progress.advance(task)
        except ScuError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(code=1) from None
    for line in failures[:50]:
        console.print(f"[red]failed[/red] {escape(line)}", highlight=False, soft_wrap=True)
    console.print(
        f"sent: {outcome['stored']} stored, {outcome['warning']} with warnings, {outcome['failed']} failed",
        highlight=False,
    )
    raise typer.Exit(code=1 if outcome["failed"] else 0)


@dimse_app.command()
def move(
    study: str = typer.Argument(..., help="Study Instance UID."),
    source: str = typer.Option(..., "--from", help="The peer holding the study: AE@host:port."),
    destination: str = typer.Option(..., "--to", help="Move destination AE title (known to the source)."),
    series: str | None = typer.Option(None, help="Only this Series Instance UID."),
    sop: list[str] = typer.Option([], help="Only these SOP Instance UIDs (needs --series)."),
    aet: str = typer.Option("DICOMHUB", help="Calling AE title."),
) -> None:
    """Ask a DIMSE peer to C-MOVE a study (or series, or instances) to a destination, with a progress bar."""
    from dicomhub.dimse.scu import MoveProgress, ScuError
    from dicomhub.dimse.scu import move as c_move

    if sop and not series:
        raise typer.BadParameter("--sop needs --series.")
    address = _address(source)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task(f"moving to {destination}", total=None)

        def update(counts: MoveProgress) -> None:
            progress.update(task, total=counts.total, completed=counts.total - counts.remaining)

        try:
            final, counts = c_move(address, destination, aet, study, series, sop, update)
        except ScuError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(code=1) from None
    console.print(
        f"move: status 0x{final:04X}, {counts.completed} completed, {counts.warning} warnings, {counts.failed} failed",
        highlight=False,
    )
    raise typer.Exit(code=0 if final == 0 else 1)
