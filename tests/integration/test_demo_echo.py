"""`tcpproxy echo`, the demo backend, over real sockets: a hostile client cannot grow it."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from tcpproxy.demo import ECHO_WRITE_HIGH_WATER_BYTES, EchoProtocol
from tests.harness import WAIT_S, Backends, LoopThread

# What the echo may hold for one connection: its high-water mark plus the one read that took
# it over (asyncio and uvloop read at most 256 KiB at a time).
READ_BYTES = 256 * 1024
BOUND_BYTES = ECHO_WRITE_HIGH_WATER_BYTES + READ_BYTES
# Far more than every buffer on the way can hold: the client's send and receive buffers, the
# echo's socket buffers (autotuned to a few MiB at most) and BOUND_BYTES.
TOTAL_BYTES = 64 << 20
# The client counts as held back once its socket has stayed full this long. This only ends
# the sending; nothing is asserted about time.
HELD_BACK_S = 1.0


@pytest.fixture(params=["uvloop", "asyncio"])
def any_loop(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    thread = LoopThread(use_uvloop=request.param == "uvloop")
    yield thread
    thread.stop()


def test_a_client_that_sends_and_never_reads_cannot_grow_the_echo(any_loop: LoopThread) -> None:
    protocols: list[EchoProtocol] = []

    def factory() -> EchoProtocol:
        protocols.append(EchoProtocol("v1"))
        return protocols[-1]

    backends = Backends(any_loop)
    host, port = backends.start("v1", factory).rsplit(":", 1)
    sock = socket.socket()
    try:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 64 * 1024)
        sock.connect((host, int(port)))
        sock.settimeout(WAIT_S)
        greeting = b"hello from v1\n"
        assert sock.recv(len(greeting), socket.MSG_WAITALL) == greeting  # the echo is up
        sock.setblocking(False)

        def buffered() -> int:
            """The echo's write buffer for this client, read on its own loop."""
            transport = protocols[0].transport
            assert transport is not None
            return transport.get_write_buffer_size()

        chunk = b"x" * (1 << 20)
        sent = 0
        most = 0
        while sent < TOTAL_BYTES:
            try:
                sent += sock.send(chunk[: TOTAL_BYTES - sent])
                continue
            except BlockingIOError:
                pass
            most = max(most, any_loop.call(buffered))
            if not select.select([], [sock], [], HELD_BACK_S)[1]:
                break  # held back: the echo stopped reading
        most = max(most, any_loop.call(buffered))

        assert sent < TOTAL_BYTES, "every byte went in: nothing held the client back"
        assert most <= BOUND_BYTES, f"the echo held {most} bytes for one client"

        # Reading again resumes the echo, and every byte comes back.
        sock.setblocking(True)
        sock.settimeout(WAIT_S)
        rest = threading.Thread(target=sock.sendall, args=(b"y" * (TOTAL_BYTES - sent),))
        rest.start()
        expected = TOTAL_BYTES
        received = 0
        while received < expected:
            data = sock.recv(1 << 20)
            assert data, f"the echo closed after {received} of {expected} bytes"
            received += len(data)
        rest.join(WAIT_S)
        assert received == expected
    finally:
        sock.close()
        backends.close()
