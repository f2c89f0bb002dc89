"""Structured logs: one line per event, `key=value` pairs, easy to grep and to parse.

    ts=2025-01-01T12:00:00.123Z level=warning logger=tsqp.server event=bad_request code=too_large ...

Events carry their fields in `record.fields`; `log_event` is the one way to emit them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Emit `event` with its fields; cheap when the level is disabled."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = str(v)
    if not text or any(c.isspace() or c in '"=\\' for c in text) or not text.isprintable():
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """`ts=… level=… logger=… event=… k=v …`: values with spaces or quotes are JSON strings."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = {"ts": ts, "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(),
                  **getattr(record, "fields", {})}
        line = " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send `tsqp.*` logs to `stream` (stderr) as key=value lines."""
    name = level.upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level '{level}' (choose from: {', '.join(LEVELS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    handler._tsqp = True  # type: ignore[attr-defined]
    logger = logging.getLogger("tsqp")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_tsqp", False)]
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, name))
    logger.propagate = False
