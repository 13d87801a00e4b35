"""The splice engine: bytes move socket -> pipe -> socket inside the kernel (os.splice),
never copied into Python. Same record interface and semantics as relay.ClientSide.

Raw non-blocking sockets driven by add_reader/add_writer. Each direction borrows a pipe
from a small pool only while it has bytes in flight; a pipe that a slow peer leaves full
is held (that is the flow control: the fast side is not read until the pipe drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from typing import TYPE_CHECKING

from tcpproxy import relay
from tcpproxy.relay import ConnectionRecord

if TYPE_CHECKING:
    from tcpproxy.connections import Backend
    from tcpproxy.relay import Owner

PIPE_SIZE_BYTES = 1 << 20
SPLICE_CHUNK_BYTES = 1 << 20
PIPE_POOL_MAX = 64
PUMP_ROUNDS = 4
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT})


class PipePool:
    """Idle pipes for reuse: making a pipe costs two syscalls and two descriptors."""

    def __init__(self, limit: int = PIPE_POOL_MAX) -> None:
        self._idle: list[tuple[int, int]] = []
        self._limit = limit

    def take(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE_BYTES)
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an empty pipe."""
        if len(self._idle) < self._limit:
            self._idle.append(pipe)
        else:
            close_pipe(pipe)


def close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


POOL = PipePool()


class _Direction:
    """One way: src socket -> pipe -> dst socket."""

    __slots__ = ("dst", "eof", "in_pipe", "pipe", "shut", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0  # bytes read from src, not yet written to dst
        self.eof = False  # src sent FIN
        self.shut = False  # FIN passed on to dst


class SpliceConnection(ConnectionRecord):
    """A proxied connection on raw sockets; the listener sees the same record as ClientSide."""

    def __init__(
        self,
        owner: Owner,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        peername: object = None,
    ) -> None:
        super().__init__(owner)
        self.loop = loop
        self.sock = sock
        # From accept(): getpeername() fails once a client has already reset.
        self.peername = peername
        self.upstream_sock: socket.socket | None = None
        self.upstream: object = None  # set when connected (the listener checks it)
        self._up: _Direction | None = None
        self._down: _Direction | None = None
        self._watch_client_early()

    # -- the interface the listener uses --

    def get_extra_info(self, name: str) -> object:
        if name == "peername":
            return self.peername
        if name == "sockname":
            try:
                return self.sock.getsockname()
            except OSError:
                return None
        return None

    @property
    def transport(self) -> SpliceConnection:
        return self

    async def open_upstream(self, backend: Backend, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self.loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        if self.closed:
            sock.close()
            return
        self._attach(backend, sock)

    def buffered_bytes(self) -> int:
        """Bytes held for this connection: early client bytes, and what sits in its pipes
        (kernel memory, bounded by the pipe size)."""
        return self.pending_bytes + sum(d.in_pipe for d in (self._up, self._down) if d)

    def write_first(self, data: bytes) -> None:
        """Bytes for the backend before any client byte (a PROXY header); small, so a
        blocking-free send on a fresh socket takes them whole."""
        assert self.upstream_sock is not None
        self.upstream_sock.sendall(data)

    def shut(self, reason: str) -> None:
        if not self.closed:
            self.reason = reason
            self._close(reset=False)

    # -- before the backend is up: read into `pending` like the copy engine --

    def _watch_client_early(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._early_readable)

    def _early_readable(self) -> None:
        try:
            data = self.sock.recv(relay.PRECONNECT_BUFFER_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc, client=True)
            return
        if not data:
            # A FIN before the backend is up is a half-close: keep it for later.
            self.loop.remove_reader(self.sock.fileno())
            self._early_eof = True
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= relay.PRECONNECT_BUFFER_BYTES:
            self.loop.remove_reader(self.sock.fileno())
        if self.awaiting_header:
            self.owner.header_received(self)  # type: ignore[arg-type]

    _early_eof = False

    def _attach(self, backend: Backend, sock: socket.socket) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.backend = backend
        self.upstream_sock = sock
        self.upstream = sock
        self._up = _Direction(self.sock, sock)
        self._down = _Direction(sock, self.sock)
        self.owner.connection_established(self)  # type: ignore[arg-type]
        if self.pending:
            data = b"".join(self.pending)
            self.pending = None
            self.pending_bytes = 0
            try:
                sent = sock.send(data)
            except OSError as exc:
                self._lost(exc, client=False)
                return
            self.bytes_up += sent
            if sent < len(data):
                # Rare (a fresh socket takes 256 KiB easily): finish it blocking-free later.
                self.loop.add_writer(sock.fileno(), self._flush_rest, data[sent:])
                return
        self._start()

    def _flush_rest(self, rest: bytes) -> None:
        assert self.upstream_sock is not None
        try:
            sent = self.upstream_sock.send(rest)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc, client=False)
            return
        self.bytes_up += sent
        if sent < len(rest):
            self.loop.add_writer(self.upstream_sock.fileno(), self._flush_rest, rest[sent:])
            return
        self.loop.remove_writer(self.upstream_sock.fileno())
        self._start()

    def _start(self) -> None:
        assert self._up is not None
        assert self._down is not None
        if self._early_eof:
            self._up.eof = True
            self._pass_fin(self._up)
        else:
            self.loop.add_reader(self._up.src.fileno(), self._pump, self._up)
        self.loop.add_reader(self._down.src.fileno(), self._pump, self._down)

    # -- the data path --

    def _pump(self, d: _Direction) -> None:
        """src readable (or dst writable again): move what we can through the pipe."""
        if self.closed:
            return
        if d.pipe is None:
            d.pipe = POOL.take()
        failing = d.src
        try:
            # Several rounds per wake-up: a socket often has more than one pipe's worth
            # queued, and each wake-up costs an epoll round trip.
            for _ in range(PUMP_ROUNDS):
                if d.in_pipe == 0 and not d.eof:
                    failing = d.src
                    n = os.splice(d.src.fileno(), d.pipe[1], SPLICE_CHUNK_BYTES, flags=_FLAGS)
                    if n == 0:
                        d.eof = True
                    else:
                        d.in_pipe = n
                failing = d.dst
                while d.in_pipe:
                    n = os.splice(d.pipe[0], d.dst.fileno(), d.in_pipe, flags=_FLAGS)
                    d.in_pipe -= n
                    self._count(d, n)
                if d.eof:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            self._lost(exc, client=failing is self.sock)
            return
        if d.in_pipe:
            # dst is full: stop reading src until dst drains (flow control).
            self.loop.remove_reader(d.src.fileno())
            self.loop.add_writer(d.dst.fileno(), self._drain, d)
            return
        POOL.give(d.pipe)
        d.pipe = None
        if d.eof:
            self.loop.remove_reader(d.src.fileno())
            self._pass_fin(d)

    def _drain(self, d: _Direction) -> None:
        if self.closed or d.pipe is None:
            return
        try:
            while d.in_pipe:
                n = os.splice(d.pipe[0], d.dst.fileno(), d.in_pipe, flags=_FLAGS)
                d.in_pipe -= n
                self._count(d, n)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc, client=d.dst is self.sock)
            return
        self.loop.remove_writer(d.dst.fileno())
        POOL.give(d.pipe)
        d.pipe = None
        if d.eof:
            self._pass_fin(d)
        else:
            self.loop.add_reader(d.src.fileno(), self._pump, d)

    def _count(self, d: _Direction, n: int) -> None:
        if d is self._up:
            self.bytes_up += n
        else:
            self.bytes_down += n

    def _pass_fin(self, d: _Direction) -> None:
        if d.shut:
            return
        d.shut = True
        if self.reason is None:
            self.reason = relay.CLIENT_CLOSED if d is self._up else relay.BACKEND_CLOSED
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)
        other = self._down if d is self._up else self._up
        if other is not None and other.shut:
            self._close(reset=False)

    # -- endings --

    def _lost(self, exc: OSError, client: bool) -> None:
        if self.closed:
            return
        if self.upstream_sock is None:
            self.reason = relay.CLIENT_GONE
        elif exc.errno in _RESET_ERRNOS:
            self.reason = relay.CLIENT_RESET if client else relay.BACKEND_RESET
        else:
            self.reason = self.reason or (relay.CLIENT_CLOSED if client else relay.BACKEND_CLOSED)
        self._close(reset=True)

    def _close(self, reset: bool) -> None:
        self.closed = True
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        for d in (self._up, self._down):
            if d is not None and d.pipe is not None:
                close_pipe(d.pipe)  # may hold unsent bytes: never back to the pool
                d.pipe = None
        for sock in (self.sock, self.upstream_sock):
            if sock is None or sock.fileno() < 0:
                continue
            self.loop.remove_reader(sock.fileno())
            self.loop.remove_writer(sock.fileno())
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self.pending = None
        self.owner.connection_closed(self)  # type: ignore[arg-type]


class SpliceServer:
    """A listening socket whose accepted connections use the splice engine."""

    def __init__(self, owner: Owner, host: str, port: int, backlog: int) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.bind(address)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._serving = False

    async def start_serving(self) -> None:
        if not self._serving and self.sock.fileno() >= 0:
            self._serving = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # bounded per wake-up, so one busy listener cannot starve the loop
            try:
                conn_sock, peername = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(0.1, self._resume)
                return
            try:
                conn_sock.setblocking(False)
                conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn_sock.close()  # reset before we got to it
                continue
            conn = SpliceConnection(self.owner, conn_sock, self.loop, peername)
            self.owner.connection_opened(conn)  # type: ignore[arg-type]

    def _resume(self) -> None:
        if self._serving and self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._serving:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self._serving = False
