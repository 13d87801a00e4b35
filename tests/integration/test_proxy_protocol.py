"""PROXY protocol over real sockets: sent to backends, required from clients."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpproxy.proxy_protocol import ProxyProtocolError, parse
from tests.harness import (
    Backends,
    Client,
    RunningProxy,
    config_yaml,
    free_port,
    listener_yaml,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")


Start = Callable[[str], RunningProxy]


def parse_from_spec(data: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    """An independent reading of the spec (proxy-protocol.txt sections 2.1 and 2.2):
    returns (source, destination, what follows the header)."""
    if data.startswith(b"PROXY "):
        line, _, rest = data.partition(b"\r\n")
        _, _, src, dst, sport, dport = line.decode().split(" ")
        return (src, int(sport)), (dst, int(dport)), rest
    assert data[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
    ver_cmd, fam, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    assert ver_cmd == 0x21  # version 2, PROXY
    body = data[16 : 16 + length]
    if fam == 0x11:
        src, dst, rest_at = (
            socket.inet_ntop(socket.AF_INET, body[0:4]),
            socket.inet_ntop(socket.AF_INET, body[4:8]),
            8,
        )
    else:
        assert fam == 0x21
        src, dst, rest_at = (
            socket.inet_ntop(socket.AF_INET6, body[0:16]),
            socket.inet_ntop(socket.AF_INET6, body[16:32]),
            32,
        )
    sport, dport = struct.unpack("!HH", body[rest_at : rest_at + 4])
    return (src, sport), (dst, dport), data[16 + length :]


class Recorder(asyncio.Protocol):
    """A backend that keeps every byte it receives and answers `ok` once it has some."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.data = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.seen.append(self.data)
        assert self.transport is not None
        self.transport.write(b"ok\n")
        return False


def pp_listener(port: int, address: str, block: str, **options: object) -> str:
    text = listener_yaml("pp", port, {"b": (address, 1)}, **options)
    return config_yaml(text + "".join(f"    {line}\n" for line in block.splitlines()))


def test_sends_v1_and_v2_with_the_client_address(backends: Backends, start_proxy: Start) -> None:
    for version in ("v1", "v2"):
        seen: list[bytes] = []
        address = backends.start(f"rec-{version}", partial(Recorder, seen))
        port = free_port()
        start_proxy(pp_listener(port, address, f"proxy_protocol:\n  send: {version}"))
        client = Client(port)
        client.sock.sendall(b"payload")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_all() == b"ok\n"
        source, destination, rest = parse_from_spec(seen[0])
        assert source == client.sock.getsockname()
        assert destination == ("127.0.0.1", port)
        assert rest == b"payload"
        client.close()


def test_accepts_a_header_and_passes_its_address_on(backends: Backends, start_proxy: Start) -> None:
    seen: list[bytes] = []
    address = backends.start("rec", lambda: Recorder(seen))
    port = free_port()
    start_proxy(pp_listener(port, address, "proxy_protocol:\n  accept: true\n  send: v2"))
    for header in (
        b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 8008\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24"
        + ipaddress.IPv6Address("2001:db8::7").packed
        + ipaddress.IPv6Address("2001:db8::1").packed
        + struct.pack("!HH", 40001, 8008),
    ):
        client = Client(port)
        for i in range(0, len(header), 5):  # the header may arrive in pieces
            client.sock.sendall(header[i : i + 5])
        client.sock.sendall(b"after the header")
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_all() == b"ok\n"
        client.close()
    (src1, _, rest1), (src2, _, rest2) = (parse_from_spec(s) for s in seen)
    assert src1 == ("203.0.113.7", 40000)
    assert src2 == ("2001:db8::7", 40001)
    assert rest1 == rest2 == b"after the header"


def test_missing_malformed_or_late_headers_are_closed_and_counted(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        pp_listener(port, v1, "proxy_protocol:\n  accept: true", connect_timeout="300ms")
    )
    for opening in (b"hello\r\n", b"PROXY TCP4 1.2.3.4 nope 1 2\r\n", b""):
        client = Client(port)
        client.sock.sendall(opening)
        assert client.is_closed()
        client.close()
    labels = {"listener": "pp", "reason": "proxy_protocol"}
    assert running.metric("tcpproxy_connections_rejected_total", **labels) == 3
    assert running.backend_stat("pp", "b", "total") == 0  # the backend never saw them
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)


@pytest.fixture
def accepting_proxy(backends: Backends, start_proxy: Start) -> tuple[RunningProxy, int, int]:
    """Two listeners that require a header: `patient` waits for one far longer than any test
    runs (so nothing there depends on how fast this machine is), `quick` for 200 ms."""
    v1 = backends.start("v1")
    patient, quick = free_port(), free_port()
    block = "    proxy_protocol:\n      accept: true\n"
    running = start_proxy(
        config_yaml(
            listener_yaml("patient", patient, {"b": (v1, 1)}, connect_timeout="1h") + block,
            listener_yaml("quick", quick, {"b": (v1, 1)}, connect_timeout="200ms") + block,
        )
    )
    return running, patient, quick


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(opening=st.one_of(st.binary(max_size=700), st.binary(max_size=40).map(b"PROXY ".__add__)))
def test_fuzzed_openings_never_hang_or_break_the_proxy(
    accepting_proxy: tuple[RunningProxy, int, int], opening: bytes
) -> None:
    running, patient, quick = accepting_proxy
    try:
        valid = parse(opening) is not None
        stalled = not valid  # a prefix of a header: only the header timeout ends it
    except ProxyProtocolError:
        valid = stalled = False
    # A stalled opening goes where the wait is short. A valid one, or one that is closed at
    # once, goes where the header timeout is an hour away: there, a close within the test's
    # wait is the proxy's answer to the bytes, never a timer that a slow machine tripped.
    client = Client(quick if stalled else patient)
    client.sock.sendall(opening)
    if valid:
        assert client.greeting() == "v1"
    else:
        assert client.is_closed()
    client.close()
    good = Client(patient)
    good.sock.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n")
    assert good.greeting() == "v1"
    good.close()
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)


@pytest.mark.parametrize(
    "opening",
    [
        b"",
        b"PROX",
        b"PROXY TCP4 203.0.113.7 198.51.100.1 400",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71",  # v2, 3 of its 12 address bytes
    ],
    ids=["nothing", "v1-prefix", "v1-cut", "v2-cut"],
)
def test_a_fin_before_the_header_is_complete_is_rejected_at_once(
    backends: Backends,
    start_proxy: Start,
    caplog: pytest.LogCaptureFixture,
    opening: bytes,
) -> None:
    caplog.set_level(logging.INFO, logger="tcpproxy.access")  # before the proxy starts
    v1 = backends.start("v1")
    port = free_port()
    # The header may take an hour: a close within the client's wait (10 s) answers the FIN.
    running = start_proxy(
        pp_listener(port, v1, "proxy_protocol:\n  accept: true", connect_timeout="1h")
    )
    client = Client(port)
    client.sock.sendall(opening)
    client.sock.shutdown(socket.SHUT_WR)

    assert client.is_closed()
    client.close()
    labels = {"listener": "pp", "reason": "proxy_protocol"}
    assert running.metric("tcpproxy_connections_rejected_total", **labels) == 1
    assert running.backend_stat("pp", "b", "total") == 0
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    ends = [r.__dict__["end"] for r in caplog.records if r.name == "tcpproxy.access"]
    assert ends == ["rejected_proxy_protocol"]
