"""Background processes of the tests and benchmarks (dicomhub itself, OIDC and FHIR servers, object stores,
Orthanc): started with their output in a log, waited for until they answer, stopped politely then firmly."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx


def answers(url: str, status: int | None = 200) -> bool:
    """True when ``url`` answers a GET (with ``status``, unless that is ``None``); False while nothing listens."""
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return status is None or response.status_code == status


def start_process(
    args: Sequence[str],
    log_path: Path,
    name: str,
    ready: Callable[[], bool],
    seconds: float = 60,
    interval: float = 0.1,
    **popen: Any,
) -> subprocess.Popen:
    """Starts ``args`` with stdout and stderr appended to ``log_path`` and returns once ``ready()`` is true.

    A process that exits first raises with its log's tail; one not ready within ``seconds`` is stopped and raises.
    """
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child process
    process = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, **popen)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log_path.read_text(errors='replace')[-3000:]}")
        if ready():
            return process
        time.sleep(interval)
    stop_process(process)
    raise RuntimeError(f"{name} did not become ready within {seconds} s")


def stop_process(process: subprocess.Popen | None, seconds: float = 30) -> None:
    """SIGTERM, and SIGKILL after ``seconds`` if the process is still there."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
