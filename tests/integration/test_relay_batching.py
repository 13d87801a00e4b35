"""The copy engine's end-of-batch writes, driven step by step over real socketpairs.

Small reads are written at the end of the poller's event batch (Poller._dispatch).
A read made outside a batch (the fairness hand-off after several full reads, run by
call_soon) must be written at once: no later batch may ever come to write it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import termios
from collections.abc import Iterator

import pytest
import uvloop

from tcpproxy import relay
from tcpproxy.lifecycle import State
from tcpproxy.poller import Poller
from tests.harness import pattern


class _Owner:
    """The listener's side, reduced to what these tests look at."""

    name = "test"

    def __init__(self) -> None:
        self.closed: list[relay.Connection] = []

    def connection_opened(self, conn: relay.Connection) -> None: ...
    def connection_established(self, conn: relay.Connection) -> None: ...
    def header_received(self, conn: relay.Connection) -> None: ...
    def accept_failed(self, exc: OSError) -> None: ...

    def connect_failed(self, conn: relay.Connection, exc: OSError) -> None:
        raise exc

    def connection_closed(self, conn: relay.Connection) -> None:
        self.closed.append(conn)


class _Backend:
    name = "b"


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    new = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield new
    new.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def _drain(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def test_a_tail_read_outside_a_batch_is_written_at_once(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> None:
        poller = Poller.of(asyncio.get_running_loop())
        client_far, client_near = _pair()  # the client, and the proxy's client socket
        upstream_near, backend_far = _pair()  # the proxy's backend socket, and the backend
        conn = relay.Connection(_Owner(), client_near, poller)
        conn.target = _Backend()  # type: ignore[assignment]
        conn.state = State.CONNECTING  # as after connect(), on a socket made here
        conn.upstream = upstream_near
        poller.watch(upstream_near.fileno(), conn._on_upstream)
        conn._connected(select.EPOLLOUT)
        # More than PUMP_ROUNDS full reads are queued, then a small tail.
        size = (relay.PUMP_ROUNDS + 1) * relay.READ_CHUNK_BYTES + 100
        data = pattern(size)
        sent = 0
        while sent < size:
            sent += client_far.send(data[sent:])
        poller._dispatch()  # full reads, then the rest handed to call_soon
        received = _drain(backend_far)
        # One small taking read, then look-first reads of a full chunk each.
        first_rounds = relay.SMALL_READ_BYTES + (relay.PUMP_ROUNDS - 1) * relay.READ_CHUNK_BYTES
        assert len(received) == first_rounds
        await asyncio.sleep(0)  # the hand-off runs (no event batch around it)
        await asyncio.sleep(0)
        received += _drain(backend_far)
        assert received == data  # the tail too, though no batch followed
        conn.shut("test")
        for s in (client_far, backend_far):
            s.close()

    loop.run_until_complete(scenario())


def test_queue_sizes_of_a_closed_socket_are_zero() -> None:
    """Regression: while a connection delivers a reset peer's last bytes, that peer's socket
    is already closed; the idle sweep's activity_mark asked its queue size and the ioctl
    on fd -1 raised, which ended the sweep for good."""
    a, b = socket.socketpair()
    a.close()
    b.close()
    assert relay._queued(a, termios.TIOCOUTQ) == 0
    assert relay._queued(a, termios.FIONREAD) == 0
