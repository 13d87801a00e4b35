"""Relay conformance: byte-exact both ways, half-close, resets, bounded memory.

Run against every relay engine (copy, splice) on every event loop the proxy supports
(uvloop and plain asyncio).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpproxy import relay, splice
from tcpproxy.proxy import Proxy
from tests.harness import (
    TCP_SYN_SENT,
    Backends,
    Client,
    LoopThread,
    RawBackend,
    RunningProxy,
    ScriptedBackend,
    config_yaml,
    free_port,
    full_accept_queue,
    listener_yaml,
    pattern,
    pattern_digest,
    read_digest,
    send_pattern,
    tcp_info,
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


def held_limit(engine: str) -> int:
    """The most a connection may hold with both directions blocked: one small read each way
    in user space (copy), or a full pipe each way (splice, kernel memory)."""
    if engine == "copy":
        return 2 * relay.SMALL_READ_BYTES
    return 2 * splice.PIPE_SIZE_BYTES


def test_slow_reader_keeps_proxy_memory_bounded(
    scripted: tuple[RunningProxy, list[tuple[str, int]]], engine: str
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
    limit = held_limit(engine)
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


def test_a_reply_that_comes_with_its_fin_arrives_whole_then_the_fin(
    scripted: tuple[RunningProxy, list[tuple[str, int]]],
) -> None:
    """A reply and the FIN behind it often come in one wake-up (a server that answers and
    closes, as Redis does after QUIT): the proxy then passes the FIN on after the reply's
    last bytes without a read to find it. Sizes around a small read's (16 KiB) too."""
    running, _ = scripted
    sizes = [1, 5, 1000, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 70_000] * 5
    for size in sizes:
        client = Client(running.port("relay"))
        try:
            client.sock.sendall(b"push %d\n" % size)
            assert client.read_all() == pattern(size)  # every byte, then EOF
        finally:
            client.close()
    wait_until(lambda: open_connections(running) == 0, what="connections closed")
    assert running.backend_stat("relay", "s", "bytes_down") == sum(sizes)


def test_both_sockets_of_a_connection_have_nodelay(echo_proxy: RunningProxy) -> None:
    """Small writes go out at once both ways (no Nagle wait on a request or a reply): the
    accepted socket has it from the listening socket, the backend socket is given it."""
    client = Client(echo_proxy.port("relay"))
    try:
        assert client.greeting() == "v1"

        def nodelay(proxy: Proxy) -> list[int]:
            [conn] = proxy.listeners["relay"].live_connections()
            assert conn.upstream is not None
            option = socket.IPPROTO_TCP, socket.TCP_NODELAY
            return [conn.sock.getsockopt(*option), conn.upstream.getsockopt(*option)]

        assert echo_proxy.state(nodelay) == [1, 1]
    finally:
        client.close()


# -- connecting: failures, retries, a client that leaves first --


def test_a_full_accept_queue_drops_syns() -> None:
    """What the connect-timeout cases rest on, checked on this machine: a connect to a full
    accept queue is neither accepted nor refused; its SYN goes unanswered and is sent again."""
    with full_accept_queue() as address:
        host, port = address.rsplit(":", 1)
        probe = socket.socket()
        try:
            probe.setblocking(False)
            probe.connect_ex((host, int(port)))
            wait_until(
                lambda: tcp_info(probe)[1] >= 1,
                what="the probe's SYN to be retransmitted",
            )
            assert tcp_info(probe)[0] == TCP_SYN_SENT
        finally:
            probe.close()


def _closed(running: RunningProxy, listener: str, backend: str, reason: str) -> float:
    value = running.metric(
        "tcpproxy_connections_closed_total", listener=listener, backend=backend, reason=reason
    )
    return value or 0


def _rejected(running: RunningProxy, listener: str, reason: str) -> float:
    value = running.metric("tcpproxy_connections_rejected_total", listener=listener, reason=reason)
    return value or 0


def test_no_backend_listening_closes_the_client(
    start_proxy: Callable[[str], RunningProxy], engine: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: refused
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("relay", port, {"d": (dead, 1)}, engine=engine))
    )
    client = Client(port)
    try:
        client.sock.sendall(b"anyone there?")
        assert client.is_closed()
    finally:
        client.close()
    wait_until(lambda: open_connections(running) == 0, what="connection forgotten")
    assert running.backend_stat("relay", "d", "connect_failures")["refused"] == 1
    assert _rejected(running, "relay", "connect_failed") == 1


@pytest.mark.parametrize("failure", ["refused", "timeout"])
def test_a_failed_connect_is_retried_on_a_backend_that_works(
    backends: Backends, start_proxy: Callable[[str], RunningProxy], engine: str, failure: str
) -> None:
    v1 = backends.start("v1")
    with full_accept_queue() as unresponsive:
        bad = unresponsive if failure == "timeout" else f"127.0.0.1:{free_port()}"
        port = free_port()
        running = start_proxy(
            config_yaml(
                listener_yaml(
                    "relay",
                    port,
                    {"bad": (bad, 1), "v1": (v1, 1)},
                    engine=engine,
                    connect_timeout="1s",
                )
            )
        )
        # Round robin sends one of the two to `bad` first; both end up on v1.
        client = Client(port)
        other = Client(port)
        try:
            for c in (client, other):
                assert c.greeting() == "v1"
                assert c.echo(b"after a retry\n") == b"after a retry\n"
        finally:
            client.close()
            other.close()
        assert running.backend_stat("relay", "bad", "connect_failures")[failure] == 1
        assert _rejected(running, "relay", "connect_failed") == 0


def test_a_client_that_leaves_before_the_backend_connects_is_cleaned_up(
    start_proxy: Callable[[str], RunningProxy], engine: str
) -> None:
    with full_accept_queue() as unresponsive:
        port = free_port()
        running = start_proxy(
            config_yaml(
                listener_yaml(
                    "relay", port, {"slow": (unresponsive, 1)}, engine=engine, connect_timeout="60s"
                )
            )
        )
        client = Client(port)
        client.sock.sendall(b"early bytes")
        wait_until(lambda: open_connections(running) == 1, what="connection accepted")
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        # Long before the 60 s connect timeout: the connect in progress is given up.
        wait_until(lambda: open_connections(running) == 0, what="connection forgotten")
        assert running.backend_stat("relay", "slow", "connect_failures")["timeout"] == 0
        assert _rejected(running, "relay", "connect_failed") == 0


def test_a_connection_still_connecting_is_idle_only_after_its_time(
    start_proxy: Callable[[str], RunningProxy], engine: str
) -> None:
    """A connection whose connect hangs moves no byte: the idle timeout ends it, and not
    sooner (the sweep's first look at a connection only records its mark)."""
    idle_s = 2.0
    with full_accept_queue() as unresponsive:
        port = free_port()
        running = start_proxy(
            config_yaml(
                listener_yaml(
                    "relay",
                    port,
                    {"slow": (unresponsive, 1)},
                    engine=engine,
                    connect_timeout="1h",
                    idle_timeout=f"{idle_s}s",
                )
            )
        )
        client = Client(port)
        opened = time.monotonic()
        assert client.is_closed(timeout=60)
        lived = time.monotonic() - opened
        client.close()
        wait_until(lambda: open_connections(running) == 0, what="connection forgotten")
        # (the margin: the client's clock starts a moment after the proxy's accept)
        assert lived >= 0.75 * idle_s, f"closed as idle after {lived:.2f}s of {idle_s}s"
        assert _rejected(running, "relay", "connect_failed") == 0


# -- who speaks first, idle --


@pytest.fixture
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.close()


def test_the_server_speaks_first(
    raw_backend: RawBackend, start_proxy: Callable[[str], RunningProxy], engine: str
) -> None:
    """The backend sends before the client has sent anything (a banner, here a large one)."""
    port = free_port()
    start_proxy(
        config_yaml(listener_yaml("relay", port, {"s": (raw_backend.address, 1)}, engine=engine))
    )
    size = 3_000_000
    client = Client(port)
    backend = raw_backend.accept()
    try:
        with ThreadPoolExecutor(1) as pool:
            banner = pool.submit(send_pattern, backend, size)
            assert client.read_exactly(size) == pattern(size)
            banner.result(timeout=1)
        client.sock.sendall(b"and now the client\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = backend.recv(1 << 16)
            assert chunk, f"backend saw EOF after {got!r}"
            got += chunk
        assert got == b"and now the client\n"
    finally:
        client.close()
        backend.close()


def test_a_silent_connection_is_closed_as_idle(
    backends: Backends, start_proxy: Callable[[str], RunningProxy], engine: str
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml("relay", port, {"v1": (v1, 1)}, engine=engine, idle_timeout="500ms")
        )
    )
    client = Client(port)
    try:
        assert client.greeting() == "v1"
        assert client.is_closed()  # nothing moved since the greeting
    finally:
        client.close()
    wait_until(lambda: open_connections(running) == 0, what="connection forgotten")
    assert _closed(running, "relay", "v1", "idle_timeout") == 1


# -- flow control both ways at once --


def test_both_ways_stalled_then_resumed_hold_bounded_memory_and_lose_nothing(
    raw_backend: RawBackend, start_proxy: Callable[[str], RunningProxy], engine: str
) -> None:
    """50 MiB each way while neither peer reads: back-pressure stops both senders, the proxy
    holds a bounded amount; then both read, and every byte arrives in order."""
    size = 50 * 1024 * 1024
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("relay", port, {"s": (raw_backend.address, 1)}, engine=engine))
    )
    client = Client(port)
    backend = raw_backend.accept()
    for s in (client.sock, backend):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    limit = held_limit(engine)
    expected = pattern_digest(size)

    def send_then_fin(sock: socket.socket) -> None:
        send_pattern(sock, size)
        sock.shutdown(socket.SHUT_WR)

    def relayed() -> tuple[int, int]:
        stat = running.backend_stat
        return stat("relay", "s", "bytes_up"), stat("relay", "s", "bytes_down")

    pool = ThreadPoolExecutor(3)
    try:
        senders = [pool.submit(send_then_fin, s) for s in (client.sock, backend)]
        wait_until(lambda: min(relayed()) > 1_000_000, what="relaying started both ways")
        samples = []
        for _ in range(20):
            samples.append(running.state(_buffered))
            threading.Event().wait(0.02)
        up_while_stalled, down_while_stalled = relayed()
        assert max(samples) <= limit, samples
        # Far less than what is offered: the kernel's buffers hold the rest of it back.
        assert up_while_stalled < size
        assert down_while_stalled < size
        # Both read now.
        at_backend = pool.submit(read_digest, backend)
        digest = hashlib.sha256()
        received = 0
        while chunk := client.sock.recv(1 << 20):
            digest.update(chunk)
            received += len(chunk)
            if received % (8 << 20) < len(chunk):
                assert running.state(_buffered) <= limit
        assert (received, digest.hexdigest()) == (size, expected)
        assert at_backend.result(timeout=60) == (size, expected)
        for sender in senders:
            sender.result(timeout=60)
    finally:
        for s in (client.sock, backend):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread still blocked on it
        pool.shutdown()
        client.close()
        backend.close()
    wait_until(lambda: open_connections(running) == 0, what="connection closed")
