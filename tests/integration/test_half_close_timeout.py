"""The half-close timeout over real sockets: a connection one side has half-closed, whose
other side never finishes (a blackholed or stuck peer), is closed after
`half_close_timeout` with no byte moving, not left until the idle timeout (or forever)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from tests.harness import (
    WAIT_S,
    Client,
    RawBackend,
    RunningProxy,
    config_yaml,
    free_port,
    listener_yaml,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")

Start = Callable[[str], RunningProxy]


@pytest.fixture
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.close()


def ends(running: RunningProxy, reason: str) -> float | None:
    return running.metric(
        "tcpproxy_connections_closed_total", listener="w", backend="raw", reason=reason
    )


def start(start_proxy: Start, backend: RawBackend, **options: object) -> tuple[RunningProxy, int]:
    port = free_port()
    options.setdefault("idle_timeout", "1h")
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"raw": (backend.address, 1)}, **options))
    )
    return running, port


def test_client_half_closed_toward_a_backend_that_never_finishes_is_closed(
    start_proxy: Start, raw_backend: RawBackend
) -> None:
    running, port = start(start_proxy, raw_backend, half_close_timeout="300ms")
    client = Client(port)
    client.sock.sendall(b"request")
    upstream = raw_backend.accept()
    assert upstream.recv(7) == b"request"
    client.sock.shutdown(socket.SHUT_WR)
    assert upstream.recv(1) == b""  # the client's FIN was passed on
    # The backend neither answers nor closes: after the half-close timeout both go.
    assert client.read_all() == b""
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert ends(running, "half_close_timeout") == 1
    client.close()
    upstream.close()


def test_backend_half_closed_toward_a_client_that_never_finishes_is_closed(
    start_proxy: Start, raw_backend: RawBackend
) -> None:
    running, port = start(start_proxy, raw_backend, half_close_timeout="300ms")
    client = Client(port)
    upstream = raw_backend.accept()
    upstream.sendall(b"answer")
    upstream.shutdown(socket.SHUT_WR)
    assert client.read_all() == b"answer"  # up to the backend's FIN, passed on
    # The client never closes its side: the proxy does, and the backend sees it.
    assert upstream.recv(1) == b""
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert ends(running, "half_close_timeout") == 1
    client.close()
    upstream.close()


def test_a_half_closed_connection_that_keeps_moving_bytes_is_not_closed(
    start_proxy: Start, raw_backend: RawBackend
) -> None:
    """A client that sent its request and FIN, and reads a long answer, is not stalled."""
    # Bytes every few ms: 1 s without one is far beyond any pause a loaded machine makes.
    running, port = start(start_proxy, raw_backend, half_close_timeout="1s")
    stalled, streaming = Client(port), Client(port)
    stalled_up, streaming_up = raw_backend.accept(), raw_backend.accept()
    for client, upstream in ((stalled, stalled_up), (streaming, streaming_up)):
        client.sock.shutdown(socket.SHUT_WR)
        assert upstream.recv(1) == b""
    while not stalled.is_closed(timeout=0.02):
        streaming_up.sendall(b"more")
        assert streaming.read_exactly(4) == b"more"
    streaming_up.sendall(b"more")
    assert streaming.read_exactly(4) == b"more"
    assert ends(running, "half_close_timeout") == 1
    # It ends as it should: the backend's FIN after the last byte.
    streaming_up.shutdown(socket.SHUT_WR)
    assert streaming.read_all() == b""
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert ends(running, "half_close_timeout") == 1
    for s in (stalled, streaming):
        s.close()
    for u in (stalled_up, streaming_up):
        u.close()


def test_zero_turns_the_half_close_timeout_off(start_proxy: Start, raw_backend: RawBackend) -> None:
    # 0 is "never", not "at once": only the idle timeout is left to end it.
    running, port = start(start_proxy, raw_backend, half_close_timeout=0, idle_timeout="300ms")
    client = Client(port)
    upstream = raw_backend.accept()
    client.sock.shutdown(socket.SHUT_WR)
    assert upstream.recv(1) == b""
    client.sock.settimeout(WAIT_S)
    assert client.read_all() == b""
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert ends(running, "idle_timeout") == 1
    assert not ends(running, "half_close_timeout")
    client.close()
    upstream.close()
