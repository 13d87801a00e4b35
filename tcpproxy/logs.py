"""Logging set-up: human text, or JSON lines that Cloud Logging and friends parse."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
ACCESS_LOGGER = "tcpproxy.access"
# Access lines are written together, at most this late, or once this many are pending.
ACCESS_WRITE_DELAY_S = 0.1
ACCESS_BATCH_LINES = 256

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


class LogHandler(logging.StreamHandler[TextIO]):
    """The process's handler. Access lines skip the LogRecord: a record, its formatting and
    a write per line cost more than the rest of a short connection (benchmarks/README.md),
    so they come formatted, in the handler's format, and are written together, within
    ACCESS_WRITE_DELAY_S. Any other record writes what is pending first, so order is kept."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        super().__init__(stream)
        self.json = fmt == "json"
        self.setFormatter(JsonFormatter() if self.json else logging.Formatter(TEXT_FORMAT))
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a write is due on
        self._second = -1  # the whole second _stamp is for
        self._stamp = ""

    def access(
        self, loop: asyncio.AbstractEventLoop, message: str, fields: dict[str, object] | None
    ) -> None:
        """One access line (`fields`: its JSON fields, only when the format is JSON)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = (
                datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
                if self.json
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            )
        ms = int((now - second) * 1000)
        if fields is None:
            line = f"{self._stamp},{ms:03d} INFO    {ACCESS_LOGGER}: {message}\n"
        else:
            entry: dict[str, object] = {
                "time": f"{self._stamp}.{ms:03d}+00:00",
                "severity": "INFO",
                "logger": ACCESS_LOGGER,
                "message": message,
            }
            entry.update(fields)
            line = json.dumps(entry, default=str) + "\n"
        pending = self._pending
        pending.append(line)
        if len(pending) >= ACCESS_BATCH_LINES:
            self.write_pending()
        elif self._flush_on is not loop:
            self._flush_on = loop
            loop.call_later(ACCESS_WRITE_DELAY_S, self.write_pending)

    def write_pending(self) -> None:
        self._flush_on = None
        if not self._pending:
            return
        self.acquire()  # another thread's record must not land inside the batch
        try:
            lines, self._pending = self._pending, []
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # the stream is gone (closed, a broken pipe): nowhere left to say so
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.write_pending()
        super().emit(record)

    def flush(self) -> None:
        if self._pending:
            self.write_pending()
        super().flush()


def access_handler() -> LogHandler | None:
    """The handler access lines can be given straight to: when every record of the access
    logger would reach that one handler and nothing else (no filter, no other handler, as
    when tests collect records)."""
    logger: logging.Logger | None = logging.getLogger(ACCESS_LOGGER)
    root = logging.getLogger()
    while logger is not None and logger is not root:
        if logger.handlers or logger.filters or not logger.propagate:
            return None
        logger = logger.parent
    if len(root.handlers) != 1 or root.filters:
        return None
    handler = root.handlers[0]
    if not isinstance(handler, LogHandler) or handler.filters or handler.level > logging.INFO:
        return None
    return handler


def setup_logging(level: str = "info", fmt: str = "text", access_log: bool = True) -> None:
    handler = LogHandler(sys.stderr, fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would repeat every admin request; ours is per proxied connection.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles logs every batch of file events at INFO; our reload line says what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).disabled = not access_log
