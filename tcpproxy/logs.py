"""Logging set-up: human text, or JSON lines that Cloud Logging and friends parse."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else was passed through `extra=` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def plural(count: int, noun: str) -> str:
    """`1 listener`, `2 listeners`: counts in log lines and messages read as English."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (RFC 3339, UTC), `severity`, `logger`, `message`,
    then every field the call passed in `extra=` (the access log's listener, backend, client,
    bytes_up, bytes_down, duration_s, end; a reload's sha256, result, trigger)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            # Cloud Logging reads `severity`; WARNING/ERROR/INFO/DEBUG are its names too.
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # One object per line: json.dumps escapes the newlines of tracebacks and messages.
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "text", access_log: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would repeat every admin request; ours is per proxied connection.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles logs every batch of file events at INFO; our reload line says what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    logging.getLogger("tcpproxy.access").disabled = not access_log
