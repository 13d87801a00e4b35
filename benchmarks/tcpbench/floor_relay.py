"""The leanest relay of tcpproxy's design, for scale: what Python itself costs per connection.

    python floor_relay.py LISTEN_PORT:BACKEND_PORT ...

The same flow as tcpproxy's copy engine (raw non-blocking sockets in an edge-triggered epoll
set of its own, watched by uvloop; accept, connect, relay, half-close, close) with nothing
else: no config, no balancer, no lifecycle, no limits, timers, metrics or log. It is only
correct for the `conn` and `rr` workloads (a request or a reply always fits the socket
buffers, so it never holds bytes), and bench.py runs it only for those, as target
`python-floor`. A figure it cannot reach, no Python proxy of this design will.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import functools
import select
import signal
import socket
import sys
from collections.abc import Callable

import uvloop

HOST = "127.0.0.1"
_WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_BUFFER = bytearray(64 * 1024)
_VIEW = memoryview(_BUFFER)


class Pair:
    """A client socket and its backend socket; `done`: which ones sent their FIN."""

    __slots__ = ("backend", "client", "connected", "done", "early")

    def __init__(self, client: _socket.socket, backend: _socket.socket) -> None:
        self.client = client
        self.backend = backend
        self.connected = False
        self.done = [False, False]  # client, backend
        self.early = b""  # client bytes before the backend is up


class Relay:
    def __init__(self, epoll: select.epoll) -> None:
        self.epoll = epoll
        self.handlers: dict[int, Callable[[int], None]] = {}

    def dispatch(self) -> None:
        handlers = self.handlers
        for fd, events in self.epoll.poll(0, 512):
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)

    def accept(self, listener: socket.socket, backend_port: int) -> None:
        accept: Callable[[], tuple[int, object]] = listener._accept  # type: ignore[attr-defined]
        for _ in range(64):
            try:
                fd, _peer = accept()
            except BlockingIOError:
                return
            client = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            client.setblocking(False)
            backend = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend.connect_ex((HOST, backend_port))
            pair = Pair(client, backend)
            self.watch(client, functools.partial(self.on_client, pair))
            self.watch(backend, functools.partial(self.on_backend, pair))

    def watch(self, sock: _socket.socket, handler: Callable[[int], None]) -> None:
        self.epoll.register(sock.fileno(), _WATCH)
        self.handlers[sock.fileno()] = handler

    def on_client(self, p: Pair, events: int) -> None:
        if not p.connected:
            with contextlib.suppress(BlockingIOError):
                p.early += p.client.recv(16 * 1024)
            return
        if not p.done[0]:
            self.pump(p, p.client, p.backend, 0)

    def on_backend(self, p: Pair, events: int) -> None:
        if not p.connected:
            p.connected = True
            if p.early:
                p.backend.send(p.early)
            self.pump(p, p.client, p.backend, 0)
        if not p.done[1] and p.client.fileno() >= 0:
            self.pump(p, p.backend, p.client, 1)

    def pump(self, p: Pair, src: _socket.socket, dst: _socket.socket, side: int) -> None:
        while True:
            try:
                n = src.recv_into(_BUFFER, 16 * 1024)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:
                p.done[side] = True
                if all(p.done):
                    for sock in (p.client, p.backend):
                        del self.handlers[sock.fileno()]
                        sock.close()
                else:
                    dst.shutdown(socket.SHUT_WR)
                return
            dst.send(_VIEW[:n])


async def serve(pairs: list[tuple[int, int]]) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(select.epoll())
    loop.add_reader(relay.epoll.fileno(), relay.dispatch)
    for listen_port, backend_port in pairs:
        listener = socket.create_server((HOST, listen_port), backlog=4096)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), relay.accept, listener, backend_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str]) -> int:
    pairs = [tuple(int(x) for x in arg.split(":", 1)) for arg in argv]
    uvloop.run(serve([(a, b) for a, b in pairs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
