"""Relay conformance: byte-exact both ways, half-close, resets, bounded memory.

Run against every relay engine (copy, splice) on every event loop the proxy supports
(uvloop and plain asyncio).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpproxy import relay
from tcpproxy.proxy import Proxy
from tests.harness import (
    Backends,
    Client,
    LoopThread,
    RunningProxy,
    ScriptedBackend,
    config_yaml,
    free_port,
    listener_yaml,
    pattern,
    wait_until,
)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_thread(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    thread = LoopThread(use_uvloop=request.param == "uvloop")
    yield thread
    thread.stop()


@pytest.fixture(params=["copy", "splice"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scripted(
    backends: Backends, start_proxy: Callable[[str], RunningProxy], engine: str
) -> tuple[RunningProxy, list[tuple[str, int]]]:
    log: list[tuple[str, int]] = []
    address = backends.start("scripted", lambda: ScriptedBackend(log))
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("relay", port, {"s": (address, 1)}, engine=engine))
    )
    return running, log


def open_connections(running: RunningProxy) -> int:
    return running.state(lambda p: p.open_connections)


@pytest.fixture
def echo_proxy(
    backends: Backends, start_proxy: Callable[[str], RunningProxy], engine: str
) -> RunningProxy:
    address = backends.start("v1")
    return start_proxy(
        config_yaml(listener_yaml("relay", free_port(), {"v1": (address, 1)}, engine=engine))
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(chunks=st.lists(st.binary(min_size=1, max_size=20_000), min_size=1, max_size=30))
def test_echo_is_byte_exact_for_any_chunking(echo_proxy: RunningProxy, chunks: list[bytes]) -> None:
    client = Client(echo_proxy.port("relay"))
    try:
        assert client.greeting() == "v1"
        for chunk in chunks:
            client.sock.sendall(chunk)
        # Our FIN reaches the backend, which still answers: half-close client -> backend.
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_all() == b"".join(chunks)
    finally:
        client.close()


def test_a_burst_arrives_whole_with_no_later_event_to_flush_it(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    """The backend sends a burst and falls silent (no FIN): every byte, the tail included,
    must reach the client without a later event on any socket to push it out."""
    running, _ = scripted
    for size in (8 * 1024 * 1024 + 123, 3 * 1024 * 1024 + 7):
        client = Client(running.port("relay"), timeout=10)
        try:
            client.sock.sendall(b"stream %d\n" % size)
            got = bytearray()
            while len(got) < size:
                chunk = client.sock.recv(1 << 20)
                assert chunk, f"closed after {len(got)} of {size} bytes"
                got += chunk
            assert bytes(got) == pattern(size)
        finally:
            client.close()


def test_upstream_bytes_arrive_exactly_and_backend_answers_after_client_fin(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    running, _ = scripted
    data = pattern(3_000_000)
    client = Client(running.port("relay"))
    client.sock.sendall(b"sink\n")
    client.sock.sendall(data)
    client.sock.shutdown(socket.SHUT_WR)
    answer = client.read_all().decode().split()
    assert answer == [str(len(data)), hashlib.sha256(data).hexdigest()]
    client.close()
    wait_until(lambda: open_connections(running) == 0, what="connection closed")
    assert running.backend_stat("relay", "s", "bytes_up") == len(data) + len(b"sink\n")


def test_backend_fin_is_passed_on_while_client_keeps_sending(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    running, log = scripted
    client = Client(running.port("relay"))
    client.sock.sendall(b"push 100000\n")
    # The backend sends 100 kB then FIN; we see EOF but our direction stays open.
    assert client.read_all() == pattern(100_000)
    client.sock.sendall(b"x" * 5000)
    client.sock.shutdown(socket.SHUT_WR)
    wait_until(lambda: ("push-eof", 5000) in log, what="backend saw the client's late bytes")
    client.close()
    wait_until(lambda: open_connections(running) == 0, what="connection closed")
    assert running.backend_stat("relay", "s", "bytes_down") == 100_000


def test_backend_reset_resets_the_client(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    running, _ = scripted
    client = Client(running.port("relay"))
    client.sock.sendall(b"reset\nboom")
    with pytest.raises(ConnectionResetError):
        client.read_all()
    client.close()
    wait_until(lambda: open_connections(running) == 0, what="proxy forgot the connection")


def test_client_reset_closes_the_backend_side(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    running, log = scripted
    client = Client(running.port("relay"))
    client.sock.sendall(b"sink\nsome bytes")
    wait_until(lambda: open_connections(running) == 1, what="connection up")
    wait_until(lambda: running.backend_stat("relay", "s", "bytes_up") == 15, what="bytes relayed")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    wait_until(lambda: any(event == "sink-lost" for event, _ in log), what="backend closed")
    wait_until(lambda: open_connections(running) == 0, what="proxy forgot the connection")


def _buffered(proxy: Proxy) -> int:
    """Bytes the proxy holds for its connections (user space; the splice engine's pipes)."""
    return sum(
        conn.buffered_bytes()
        for listener in proxy.all_listeners()
        for conn in listener.live_connections()
    )


def test_slow_reader_keeps_proxy_memory_bounded(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    running, _ = scripted
    size = 200 * 1024 * 1024
    client = Client(running.port("relay"))
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.sock.sendall(b"push %d\n" % size)
    # The client reads nothing: the backend must be stopped by back-pressure, not buffered.
    wait_until(
        lambda: running.backend_stat("relay", "s", "bytes_down") > 1_000_000,
        what="relay started",
    )
    samples = []
    for _ in range(20):
        samples.append(running.state(_buffered))
        threading.Event().wait(0.02)
    relayed_while_stalled = running.backend_stat("relay", "s", "bytes_down")
    limit = 2 * relay.READ_CHUNK_BYTES + 2 * 1024 * 1024
    assert max(samples) <= limit, samples
    assert relayed_while_stalled < 64 * 1024 * 1024  # far less than the 200 MB offered
    # Now read it all: every byte arrives, in order.
    received = 0
    digest = hashlib.sha256()
    while chunk := client.sock.recv(1 << 20):
        digest.update(chunk)
        received += len(chunk)
        if received % (16 << 20) < len(chunk):
            assert running.state(_buffered) <= limit
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    client.close()


def test_slow_reader_gets_every_byte_after_both_fins(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    """Regression (found by the soak): the client half-closes, the backend pushes and then
    sends FIN while the proxy still holds bytes for the slow client; they must all arrive."""
    running, _ = scripted
    size = 16_000_000
    client = Client(running.port("relay"))
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sock.sendall(b"push %d\n" % size)
        client.sock.shutdown(socket.SHUT_WR)
        digest = hashlib.sha256()
        received = 0
        # Slow enough that the proxy always has bytes buffered for us when the FIN comes.
        while chunk := client.sock.recv(16 * 1024):
            digest.update(chunk)
            received += len(chunk)
            threading.Event().wait(0.0002)
    finally:
        client.close()
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
