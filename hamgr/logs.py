"""Structured logs for hamgr's daemons: one JSON object per line when stderr is not a terminal.

Every record carries ``ts`` (UTC, RFC 3339 with microseconds), ``level``, ``logger`` and ``msg``,
plus whatever the call passed in ``extra=`` (``unit``, ``epoch``, ``peer_key`` ...), so a log
shipper can index the fields without parsing sentences. ``exc`` holds the traceback when there is
one. On a terminal the same records are printed as readable lines with the extras appended.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, Final, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _ts(record: logging.LogRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
            "thread": record.threadName,
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{_ts(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(
    level: str | int = "INFO", *, json_lines: bool | None = None, stream: TextIO | None = None
) -> None:
    """Send every hamgr log to `stream` (stderr); JSON unless it is a terminal.

    `HAMGR_LOG_LEVEL` overrides `level`; `HAMGR_LOG_FORMAT=json|text` overrides the choice.
    """
    stream = stream or sys.stderr
    fmt = os.environ.get("HAMGR_LOG_FORMAT")
    if fmt in ("json", "text"):
        json_lines = fmt == "json"
    if json_lines is None:
        json_lines = not stream.isatty()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(os.environ.get("HAMGR_LOG_LEVEL", level))
