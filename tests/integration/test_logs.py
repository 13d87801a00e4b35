"""Logs over real connections: JSON and text lines, the access line and its end reasons."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from tcpproxy.logs import JsonFormatter, setup_logging
from tests.harness import (
    Backends,
    Client,
    RunningProxy,
    ScriptedBackend,
    config_yaml,
    free_port,
    listener_yaml,
    wait_until,
)

Start = Callable[[str], RunningProxy]
ACCESS_FIELDS = {"listener", "backend", "client", "bytes_up", "bytes_down", "duration_s", "end"}
GREETING = len("hello from v1\n")


@pytest.fixture(params=["copy", "splice"])
def engine(request: pytest.FixtureRequest) -> str:
    """Both relay engines report the same end reasons and byte counts."""
    engine: str = request.param
    return engine


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access() -> Iterator[list[logging.LogRecord]]:
    """Records of the `tcpproxy.access` logger. Listeners decide once, when they are made,
    whether to log access, so this must be set up before the proxy starts."""
    logger = logging.getLogger("tcpproxy.access")
    saved = (logger.level, logger.disabled)
    collect = Collect()
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logger.addHandler(collect)
    yield collect.records
    logger.removeHandler(collect)
    logger.setLevel(saved[0])
    logger.disabled = saved[1]


@pytest.fixture
def configure_logging() -> Iterator[Callable[..., io.StringIO]]:
    """Run the real setup_logging, but write to a buffer; put logging back afterwards."""
    root = logging.getLogger()
    access_logger = logging.getLogger("tcpproxy.access")
    aiohttp_access = logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, access_logger.disabled, aiohttp_access.level)

    def configure(**kwargs: Any) -> io.StringIO:
        setup_logging(**kwargs)
        buffer = io.StringIO()
        [handler] = root.handlers
        cast(logging.StreamHandler[Any], handler).setStream(buffer)
        return buffer

    yield configure
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    access_logger.disabled = saved[2]
    aiohttp_access.setLevel(saved[3])


def one_access_line(records: list[logging.LogRecord], n: int = 1) -> logging.LogRecord:
    wait_until(lambda: len(records) >= n, what=f"{n} access lines")
    assert len(records) == n
    record = records[-1]
    # The same record as a JSON line, the way Cloud Logging receives it.
    entry = json.loads(JsonFormatter().format(record))
    assert set(entry) >= ACCESS_FIELDS
    assert entry["severity"] == "INFO"
    assert entry["logger"] == "tcpproxy.access"
    return record


def field(record: logging.LogRecord, name: str) -> Any:
    return record.__dict__[name]


def client_address(c: Client) -> str:
    host, port = c.sock.getsockname()[:2]
    return f"{host}:{port}"


# -- end reasons --


def test_client_closed(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    start_proxy(config_yaml(listener_yaml("app", port, {"v1": (v1, 1)}, engine=engine)))
    c = Client(port)
    assert c.greeting() == "v1"
    assert c.echo(b"ping\n") == b"ping\n"
    address = client_address(c)
    c.close()
    record = one_access_line(access)
    assert field(record, "end") == "client_closed"
    assert field(record, "listener") == "app"
    assert field(record, "backend") == "v1"
    assert field(record, "client") == address
    assert field(record, "bytes_up") == 5
    assert field(record, "bytes_down") == GREETING + 5
    assert field(record, "duration_s") >= 0
    message = record.getMessage()
    assert message.startswith(f"app {address} -> v1 up=5 down={GREETING + 5} ")
    assert message.endswith(" client_closed")


class GreetAndClose(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(b"bye\n")
        transport.close()


def test_backend_closed(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    closer = backends.start("closer", GreetAndClose)
    port = free_port()
    start_proxy(config_yaml(listener_yaml("app", port, {"closer": (closer, 1)}, engine=engine)))
    c = Client(port)
    assert c.read_all() == b"bye\n"  # the backend's FIN reaches us
    c.close()
    record = one_access_line(access)
    assert field(record, "end") == "backend_closed"
    assert (field(record, "bytes_up"), field(record, "bytes_down")) == (0, 4)


def test_idle_timeout(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    start_proxy(
        config_yaml(
            listener_yaml("app", port, {"v1": (v1, 1)}, idle_timeout="200ms", engine=engine)
        )
    )
    c = Client(port)
    assert c.greeting() == "v1"
    assert c.is_closed()
    c.close()
    record = one_access_line(access)
    assert field(record, "end") == "idle_timeout"
    assert field(record, "bytes_down") == GREETING


def test_drain_deadline(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml("app", port, {"v1": (v1, 1)}, drain_timeout="200ms", engine=engine)
        )
    )
    c = Client(port)
    assert c.greeting() == "v1"
    running.write_config(
        config_yaml(
            listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="200ms", engine=engine)
        )
    )
    assert running.reload().result == "success"
    assert c.is_closed()
    c.close()
    record = one_access_line(access)
    assert field(record, "end") == "drain_deadline"
    assert field(record, "backend") == "v1"


def test_shutdown(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("app", port, {"v1": (v1, 1)}, engine=engine)))
    c = Client(port)
    assert c.greeting() == "v1"
    running.shutdown(0)
    assert c.is_closed()
    c.close()
    assert field(one_access_line(access), "end") == "shutdown"


def test_connect_failed_and_no_backend(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    v1 = backends.start("v1")
    dead = f"127.0.0.1:{free_port()}"
    refused, empty = free_port(), free_port()
    start_proxy(
        config_yaml(
            listener_yaml("refused", refused, {"dead": (dead, 1)}, engine=engine),
            listener_yaml("empty", empty, {"v1": (v1, 0)}, engine=engine),
        )
    )
    c = Client(refused)
    assert c.is_closed()
    c.close()
    record = one_access_line(access)
    assert field(record, "end") == "connect_failed"
    assert field(record, "backend") is None
    assert field(record, "listener") == "refused"
    c = Client(empty)
    assert c.is_closed()
    c.close()
    record = one_access_line(access, 2)
    assert field(record, "end") == "rejected_no_backend"
    assert field(record, "listener") == "empty"


def test_backend_reset_and_client_reset(
    backends: Backends, start_proxy: Start, access: list[logging.LogRecord], engine: str
) -> None:
    events: list[tuple[str, int]] = []
    scripted = backends.start("s", lambda: ScriptedBackend(events))
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("app", port, {"s": (scripted, 1)}, engine=engine))
    )
    c = Client(port)
    c.sock.sendall(b"reset\nboom")
    with pytest.raises(ConnectionResetError):
        c.read_all()
    c.close()
    assert field(one_access_line(access), "end") == "backend_reset"

    c = Client(port)
    c.sock.sendall(b"sink\nsome")
    # Reset only once the connection is relaying (else it would be `client_gone`).
    sent = len(b"reset\nboom") + len(b"sink\nsome")
    wait_until(lambda: running.backend_stat("app", "s", "bytes_up") == sent, what="relaying")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    assert field(one_access_line(access, 2), "end") == "client_reset"


# -- formats --


def test_json_lines_carry_time_severity_message_and_fields(
    backends: Backends, start_proxy: Start, configure_logging: Callable[..., io.StringIO]
) -> None:
    out = configure_logging(level="info", fmt="json")
    v1 = backends.start("v1")
    dead = f"127.0.0.1:{free_port()}"
    port = free_port()
    good = config_yaml(listener_yaml("app", port, {"v1": (v1, 1), "dead": (dead, 1)}))
    running = start_proxy(good)
    for _ in range(2):  # one of them tries the dead backend first: a WARNING line
        c = Client(port)
        assert c.greeting() == "v1"
        c.close()
    wait_until(lambda: out.getvalue().count('"tcpproxy.access"') == 2, what="access lines")
    running.write_config(good.replace("weight: 1", "weight: 2", 1))
    good_reload = running.reload()
    running.write_config("listeners: [")
    bad_reload = running.reload()

    lines = out.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "severity", "message", "logger"} <= set(entry)
        stamp = datetime.fromisoformat(entry["time"])
        assert stamp.utcoffset() is not None
        assert stamp.utcoffset() == UTC.utcoffset(None)
        assert entry["severity"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    access = [e for e in entries if e["logger"] == "tcpproxy.access"]
    assert [(e["listener"], e["backend"], e["end"]) for e in access] == [
        ("app", "v1", "client_closed")
    ] * 2
    assert all(set(e) >= ACCESS_FIELDS for e in access)
    assert all(e["bytes_down"] == GREETING for e in access)
    [warning] = [e for e in entries if e["severity"] == "WARNING"]
    assert (warning["backend"], warning["reason"]) == ("dead", "refused")
    reloads = [e for e in entries if "sha256" in e]
    start_up, applied, rejected = reloads
    assert (start_up["trigger"], start_up["result"]) == ("startup", "success")
    assert (applied["result"], applied["sha256"]) == ("success", good_reload.sha256)
    assert applied["trigger"] == "test"
    assert (rejected["result"], rejected["sha256"]) == ("failure", bad_reload.sha256)
    assert rejected["severity"] == "ERROR"
    assert bad_reload.problems[0] in rejected["message"]


def test_text_lines(
    backends: Backends, start_proxy: Start, configure_logging: Callable[..., io.StringIO]
) -> None:
    out = configure_logging(level="info", fmt="text")
    v1 = backends.start("v1")
    port = free_port()
    start_proxy(config_yaml(listener_yaml("app", port, {"v1": (v1, 1)})))
    c = Client(port)
    assert c.greeting() == "v1"
    address = client_address(c)
    c.close()
    wait_until(lambda: "tcpproxy.access" in out.getvalue(), what="access line")
    [line] = [x for x in out.getvalue().splitlines() if "tcpproxy.access" in x]
    assert f"INFO    tcpproxy.access: app {address} -> v1 up=0 down={GREETING} " in line
    assert line.endswith(" client_closed")
    assert any("config applied" in x and "sha256=" in x for x in out.getvalue().splitlines())


def test_access_log_can_be_switched_off(
    backends: Backends, start_proxy: Start, configure_logging: Callable[..., io.StringIO]
) -> None:
    out = configure_logging(level="info", fmt="json", access_log=False)
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("app", port, {"v1": (v1, 1)})))
    for _ in range(3):
        c = Client(port)
        assert c.greeting() == "v1"
        c.close()
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0, what="closed")
    assert running.metric("tcpproxy_connections_total", listener="app", backend="v1") == 3
    loggers = {json.loads(line)["logger"] for line in out.getvalue().splitlines()}
    assert "tcpproxy" in loggers  # other lines still come
    assert "tcpproxy.access" not in loggers


def test_json_formatter_keeps_odd_values_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "tcpproxy", logging.ERROR, __file__, 1, "failed: %s", ("ünïcode",), exc_info
    )
    record.__dict__.update({"path": object(), "count": 3, "nothing": None})
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed: ünïcode"
    assert entry["severity"] == "ERROR"
    assert entry["count"] == 3
    assert entry["nothing"] is None
    assert entry["path"].startswith("<object object")
    assert "ValueError: boom" in entry["exception"]
    assert "\n" not in JsonFormatter().format(record)  # one line, whatever the traceback
