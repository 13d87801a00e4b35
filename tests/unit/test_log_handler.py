"""The log handler's access lines: formatted like any record's, written once per loop turn,
never after a later record."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from tcpproxy.logs import (
    ACCESS_BATCH_LINES,
    ACCESS_LOGGER,
    JsonFormatter,
    LogHandler,
    access_handler,
    setup_logging,
)

FIELDS: dict[str, object] = {"listener": "app", "backend": "v1", "end": "client_closed"}


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


class Out(io.StringIO):
    """A stream that says when it is written to (on the loop, as the handler writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.wrote = asyncio.Event()

    def write(self, text: str) -> int:
        self.wrote.set()
        return super().write(text)


async def written(out: Out) -> None:
    """Until the handler has written (it does within a fraction of a second)."""
    async with asyncio.timeout(10):
        await out.wrote.wait()


def text_of(record: logging.LogRecord, handler: LogHandler) -> str:
    assert handler.formatter is not None
    return handler.formatter.format(record)


def test_a_text_access_line_is_what_the_formatter_writes() -> None:
    out = Out()
    handler = LogHandler(out, "text")

    async def main() -> None:
        handler.access(asyncio.get_running_loop(), "app 1.2.3.4:5 -> v1 up=1 down=2", None)
        assert out.getvalue() == ""  # not at once: together with the lines that follow it
        await written(out)

    asyncio.run(main())
    line = out.getvalue()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    record = logging.makeLogRecord(
        {"name": ACCESS_LOGGER, "levelno": logging.INFO, "levelname": "INFO", "msg": "x"}
    )
    expected = text_of(record, handler).replace(": x", ": app 1.2.3.4:5 -> v1 up=1 down=2")
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.sub(stamp, "T", line.rstrip("\n")) == re.sub(stamp, "T", expected)


def test_a_json_access_line_is_what_the_json_formatter_writes() -> None:
    out = Out()
    handler = LogHandler(out, "json")

    async def main() -> None:
        handler.access(asyncio.get_running_loop(), "app -> v1", FIELDS)
        await written(out)

    asyncio.run(main())
    entry = json.loads(out.getvalue())
    record = logging.makeLogRecord(
        {"name": ACCESS_LOGGER, "levelno": logging.INFO, "levelname": "INFO", "msg": "app -> v1"}
        | FIELDS
    )
    expected = json.loads(JsonFormatter().format(record))
    assert entry.keys() == expected.keys()
    assert {k: v for k, v in entry.items() if k != "time"} == {
        k: v for k, v in expected.items() if k != "time"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_access_lines_come_before_a_later_record_and_in_order() -> None:
    out = io.StringIO()
    handler = LogHandler(out, "text")
    logger = logging.getLogger("tcpproxy.test_order")
    logger.addHandler(handler)
    logger.propagate = False
    try:

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for n in range(3):
                handler.access(loop, f"line {n}", None)
            logger.warning("after them")  # in the same turn: the pending lines go first

        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = out.getvalue().splitlines()
    assert [x.rsplit(": ", 1)[1] for x in lines] == ["line 0", "line 1", "line 2", "after them"]


def test_a_full_batch_is_written_at_once() -> None:
    out = io.StringIO()
    handler = LogHandler(out, "text")
    loop = asyncio.new_event_loop()
    try:
        for n in range(ACCESS_BATCH_LINES):
            assert out.getvalue().count("\n") == 0
            handler.access(loop, f"line {n}", None)
    finally:
        loop.close()
    assert out.getvalue().count("\n") == ACCESS_BATCH_LINES


def test_flush_writes_what_is_pending_when_no_loop_turn_comes() -> None:
    """At exit, logging.shutdown() flushes every handler: a line of the last turn is kept."""
    out = io.StringIO()
    handler = LogHandler(out, "text")
    loop = asyncio.new_event_loop()
    try:
        handler.access(loop, "the last one", None)
    finally:
        loop.close()  # its turn never comes
    handler.flush()
    assert out.getvalue().endswith(": the last one\n")


def test_access_lines_go_through_records_when_anything_else_wants_them(
    root_logging: None,
) -> None:
    setup_logging("info", "text")
    assert isinstance(access_handler(), LogHandler)
    collect = logging.Handler()
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(collect)
    try:
        assert access_handler() is None  # a handler of its own: records, as before
    finally:
        access.removeHandler(collect)
    logging.getLogger().addHandler(collect)  # as pytest's caplog does
    assert access_handler() is None
