"""Structured logging: one JSON object per line, extra fields included, the same in every process."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:  # a line per request: orjson takes a third of the standard library's time
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits
            return json.dumps(entry, default=str)


def logging_config(level: str, as_json: bool) -> dict[str, Any]:
    """The logging set-up of every dicomhub process, for ``logging.config.dictConfig``.

    ``serve`` also hands it to uvicorn, which applies it in each worker process it starts: those are spawned, not
    forked, so they would otherwise run with no handler at all (request lines lost, bare tracebacks).
    """
    line = {"()": JsonFormatter} if as_json else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,  # loggers made at import time (dicomhub.*, uvicorn.*) keep working
        "formatters": {"line": line},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        # uvicorn's other loggers propagate to the root; its access log would repeat the request line of app.py
        # and alembic's plugin set-up says nothing an operator needs, once per process at every start
        "loggers": {
            "uvicorn.access": {"handlers": [], "propagate": False},
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }


def configure_logging(level: str, as_json: bool) -> dict[str, Any]:
    """Applies the set-up to this process and returns it, for the processes this one starts."""
    config = logging_config(level, as_json)
    logging.config.dictConfig(config)
    return config
