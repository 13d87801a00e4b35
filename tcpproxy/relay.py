"""The copy engine: raw non-blocking sockets in an edge-triggered epoll set of our own.

Why not asyncio transports and protocols: a transport can only be made by a coroutine
(create_connection), which costs a Task per connection, and uvloop's transports add a copy
per read and several syscalls per connection. Measured on the new-connection benchmark (see
benchmarks/README.md), this path costs 52-54 us of CPU per connection instead of 62-74.
Linux only (epoll; the CLI says so elsewhere).

Flow control is one chunk deep: when the destination does not take a whole chunk, the rest is
kept and the source is not read again until it is written. So the proxy never holds more than
one chunk per direction; the kernel's socket buffers do the rest. Small reads are written at
the end of the event batch, after all its reads: each write wakes a peer that may preempt us.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tcpproxy.connections import Backend

log = logging.getLogger("tcpproxy")

# One read; also the most a direction holds in user space while its destination is full.
READ_CHUNK_BYTES = 256 * 1024
# Client bytes held while the backend connection is being set up; past this, stop reading.
PRECONNECT_BUFFER_BYTES = 256 * 1024

# Reads per wake-up before other connections get a turn.
PUMP_ROUNDS = 4
# A read smaller than this is written at the end of the event batch, with the others.
BATCHED_WRITE_MAX_BYTES = 16 * 1024
_MAX_EVENTS = 512

_WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_READABLE = select.EPOLLIN | _HANGUP
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT})
# Every read lands here and is written at once; only an unsent rest is copied out. One
# buffer serves every connection: the loop runs one callback at a time.
_BUFFER = bytearray(READ_CHUNK_BYTES)
_VIEW = memoryview(_BUFFER)

# End reasons as they appear in the access log.
CLIENT_CLOSED = "client_closed"
BACKEND_CLOSED = "backend_closed"
CLIENT_RESET = "client_reset"
BACKEND_RESET = "backend_reset"
CLIENT_GONE = "client_gone"  # left before the backend connection was up
CONNECT_FAILED = "connect_failed"
IDLE_TIMEOUT = "idle_timeout"
DRAIN_DEADLINE = "drain_deadline"
SHUTDOWN = "shutdown"


class Owner(Protocol):
    """What a connection reports to (the listener)."""

    def connection_opened(self, conn: Connection) -> None: ...
    def connection_established(self, conn: Connection) -> None: ...
    def connect_failed(self, conn: Connection, exc: OSError) -> None: ...
    def accept_failed(self, exc: OSError) -> None: ...
    def header_received(self, conn: Connection) -> None: ...
    def connection_closed(self, conn: Connection) -> None: ...


class Poller:
    """One edge-triggered epoll set for a loop's proxied sockets, itself watched by the loop.

    Why not the loop's add_reader/add_writer: uvloop makes a poll handle per descriptor and
    every add or remove costs one to three epoll_ctl calls, a dozen per connection. Here a
    socket is registered once, for both directions, and closing it unregisters it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the loop (the registry's key) must not be kept alive by its own poller.
        self.loop: asyncio.AbstractEventLoop = weakref.proxy(loop)
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        # Descriptors closed during the batch being dispatched: their remaining events in
        # it are stale (and the number may already belong to a new socket).
        self._closed: set[int] = set()
        self.writes: list[tuple[Connection, Direction]] = []  # held until the batch's end
        self.dispatching = False  # (a read outside a batch is written at once)
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Poller:
        poller = _POLLERS.get(loop)
        if poller is None:
            poller = _POLLERS[loop] = cls(loop)
        return poller

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self._epoll.register(fd, _WATCH)
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Call before closing fd."""
        del self._handlers[fd]
        self._closed.add(fd)

    def _dispatch(self) -> None:
        closed = self._closed
        closed.clear()
        handlers = self._handlers
        self.dispatching = True
        for fd, events in self._epoll.poll(0, _MAX_EVENTS):
            if fd not in closed:
                try:
                    handlers[fd](events)
                except Exception:  # a bug; the rest of the batch must still run (edge-triggered)
                    log.exception("tcpproxy: error handling socket events")
        # Small reads were held back (Connection._pump): write them now, after every read
        # of the batch, so the peers we wake do not preempt us between reads.
        writes = self.writes
        while writes:
            conn, d = writes.pop()
            if d.rest and not conn.closed:
                try:
                    conn._flush(d)
                except Exception:
                    log.exception("tcpproxy: error handling socket events")
        self.dispatching = False


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()


class Direction:
    """One way: src socket -> dst socket."""

    __slots__ = ("dst", "eof", "hup", "in_pipe", "pipe", "ready", "rest", "shut", "src", "upstream")

    def __init__(self, src: socket.socket, dst: socket.socket | None, upstream: bool) -> None:
        self.src = src
        self.dst = dst  # None until the backend is up (client -> backend)
        self.upstream = upstream  # client -> backend
        # Edge-triggered: src may have bytes (or its FIN) we have not read yet.
        self.ready = False
        self.hup = False  # src's FIN or error was signalled: read on until it shows
        self.rest: bytes = b""  # read from src, not yet taken by dst
        self.pipe: tuple[int, int] | None = None  # the splice engine's
        self.in_pipe = 0  # bytes in that pipe
        self.eof = False  # src sent FIN
        self.shut = False  # FIN passed on to dst


class Connection:
    """A proxied connection: the client socket, its backend socket, and what the listener
    keeps about it (byte counts, end reason, the backend it is pinned to)."""

    __slots__ = (
        "awaiting_header",
        "backend",
        "bytes_down",
        "bytes_up",
        "closed",
        "connect_task",
        "down",
        "idle_mark",
        "idle_since",
        "local",
        "loop",
        "opened_at",
        "owner",
        "peer",
        "peername",
        "pending",
        "pending_bytes",
        "poller",
        "reason",
        "sock",
        "target",
        "timer",
        "tried",
        "up",
        "upstream",
    )

    def __init__(
        self, owner: Owner, sock: socket.socket, poller: Poller, peername: object = None
    ) -> None:
        self.owner = owner
        self.poller = poller
        self.loop = poller.loop
        self.sock = sock
        # From accept(): getpeername() fails once a client has already reset.
        self.peername = peername
        self.upstream: socket.socket | None = None  # the backend socket, once connecting
        self.target: Backend | None = None  # the backend being connected to
        self.backend: Backend | None = None  # the backend this connection is pinned to
        self.up = Direction(sock, None, upstream=True)
        self.down: Direction | None = None
        self.tried: tuple[Backend, ...] = ()  # backends that failed to connect, in order
        self.pending: list[bytes] | None = None  # client bytes before the backend is up
        self.pending_bytes = 0
        # The connect timeout (or the PROXY header wait), and a name lookup in progress.
        self.timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        # True while a required PROXY protocol header has not fully arrived.
        self.awaiting_header = False
        self.bytes_up = 0
        self.bytes_down = 0
        # Idle detection compares byte counts between sweeps (see Listener._sweep_idle), so
        # the data path pays nothing for it.
        self.idle_mark = -1
        self.idle_since = 0.0
        self.opened_at = 0.0
        self.peer: object = None
        self.local: object = None  # the address the client reached, from a PROXY header
        self.reason: str | None = None
        self.closed = False
        poller.watch(sock.fileno(), self._on_client)

    # -- what the listener asks of a connection --

    def await_header(self) -> None:
        """Hold the client's bytes until a PROXY protocol header is in (header_received)."""
        self.awaiting_header = True

    def header_done(self) -> None:
        self.awaiting_header = False

    def activity_mark(self) -> int:
        """A number that changes whenever bytes move either way, read or written: the idle
        sweep compares it between sweeps, so the data path pays nothing for idle detection."""
        return self.bytes_up + self.bytes_down + self.pending_bytes

    def sockname(self) -> object:
        try:
            return self.sock.getsockname()
        except OSError:
            return None

    # -- events --

    def _on_client(self, events: int) -> None:
        down = self.down
        if events & _WRITABLE and down is not None and (down.rest or down.in_pipe):
            self._flush(down)
            if self.closed:
                return
        if events & _READABLE:
            up = self.up
            up.ready = True
            if events & _HANGUP:
                up.hup = True
            if up.dst is None:
                self._read_early()
            elif not (up.rest or up.in_pipe or up.eof):
                self._pump(up)

    def _on_upstream(self, events: int) -> None:
        down = self.down
        if down is None:
            if events & _WRITABLE:
                self._connected(events)
            return
        up = self.up
        if events & _WRITABLE and (up.rest or up.in_pipe):
            self._flush(up)
            if self.closed:
                return
        if events & _READABLE:
            down.ready = True
            if events & _HANGUP:
                down.hup = True
            if not (down.rest or down.in_pipe or down.eof):
                self._pump(down)

    # -- connecting (the listener picks the backend, retries and times out) --

    def connect(self, host: str, port: int) -> None:
        """Start a non-blocking connect to `target`; the owner hears connection_established
        or connect_failed. Raises OSError when it fails at once (refused, out of fds)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
            self.poller.watch(sock.fileno(), self._on_upstream)
        except BaseException:
            sock.close()
            raise
        self.upstream = sock

    def abort_connect(self) -> None:
        """Give up the connect in progress (timed out, or the client left)."""
        sock = self.upstream
        if sock is not None and self.backend is None:
            self.upstream = None
            self.poller.forget(sock.fileno())
            sock.close()

    def _connected(self, events: int) -> None:
        sock = self.upstream
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.abort_connect()
            self.owner.connect_failed(self, OSError(err, f"connect: {errno.errorcode[err]}"))
            return
        assert self.target is not None
        self.backend = self.target
        up = self.up
        up.dst = sock
        self.down = down = Direction(sock, self.sock, upstream=False)
        # The backend may have spoken already (a greeting): edge-triggered, so this event
        # is the only word of it.
        down.ready = bool(events & _READABLE)
        down.hup = bool(events & _HANGUP)
        self.owner.connection_established(self)
        if self.closed:
            return
        if self.pending:
            up.rest = b"".join(self.pending)
            self.bytes_up += self.pending_bytes
            self.pending = None
            self.pending_bytes = 0
            self._flush(up)
        elif up.eof:
            self._pass_fin(up)
        elif up.ready:
            self._pump(up)
        if not self.closed and down.ready:
            self._pump(down)

    def write_first(self, data: bytes) -> None:
        """Bytes for the backend before any client byte (a PROXY header): small, and a
        fresh socket's buffer takes them whole."""
        assert self.upstream is not None
        self.upstream.sendall(data)

    # -- before the backend is up: hold what the client sends --

    def _read_early(self) -> None:
        up = self.up
        got = False
        while up.ready and self.pending_bytes < PRECONNECT_BUFFER_BYTES:
            want = PRECONNECT_BUFFER_BYTES - self.pending_bytes
            try:
                data = self.sock.recv(want)
            except BlockingIOError:
                up.ready = False
                break
            except OSError as exc:
                self._lost(exc, client=True)
                return
            if not data:
                # A FIN before the backend is up is a half-close: pass it on once connected.
                up.ready = False
                up.eof = True
                break
            if len(data) < want and not up.hup:
                up.ready = False  # a short read took all there was
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
            self.pending_bytes += len(data)
            got = True
        if got and self.awaiting_header:
            self.owner.header_received(self)

    # -- the data path --

    def _pump(self, d: Direction) -> None:
        """src has bytes: read and write them on at once, until src is empty or dst full."""
        assert d.dst is not None
        for _ in range(PUMP_ROUNDS):
            try:
                n = d.src.recv_into(_BUFFER)
            except BlockingIOError:
                d.ready = False
                return
            except OSError as exc:
                self._lost(exc, client=d.upstream)
                return
            if n == 0:
                d.ready = False
                d.eof = True
                self._pass_fin(d)
                return
            if n < READ_CHUNK_BYTES and not d.hup:
                d.ready = False  # a short read took all there was
            if d.upstream:
                self.bytes_up += n
            else:
                self.bytes_down += n
            if n < BATCHED_WRITE_MAX_BYTES and not d.ready and self.poller.dispatching:
                # A small read, all there was: write it with the rest of the batch's writes.
                d.rest = _VIEW[:n].tobytes()
                self.poller.writes.append((self, d))
                return
            try:
                sent = d.dst.send(_VIEW[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(exc, client=not d.upstream)
                return
            if sent < n:
                # dst is full: keep the rest; its next writable event goes on from there.
                d.rest = _VIEW[sent:n].tobytes()
                return
            if not d.ready:
                return
        # Still more: let other connections run first.
        self.loop.call_soon(self._resume, d)

    def _resume(self, d: Direction) -> None:
        if d.ready and not (self.closed or d.rest or d.in_pipe or d.eof):
            self._pump(d)

    def _flush(self, d: Direction) -> None:
        """dst is writable: write what it did not take before, then go on reading src."""
        assert d.dst is not None
        try:
            sent = d.dst.send(d.rest)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc, client=not d.upstream)
            return
        d.rest = d.rest[sent:]
        if d.rest:
            return
        if d.eof:
            self._pass_fin(d)
        elif d.ready:
            self._pump(d)

    def buffered_bytes(self) -> int:
        """Bytes held in user space for this connection."""
        held = self.pending_bytes + len(self.up.rest)
        if self.down is not None:
            held += len(self.down.rest)
        return held

    def _pass_fin(self, d: Direction) -> None:
        if d.shut:
            return
        d.shut = True
        if self.reason is None:
            self.reason = CLIENT_CLOSED if d.upstream else BACKEND_CLOSED
        other = self.down if d.upstream else self.up
        if other is not None and other.shut:
            # Both ways done and nothing held here: close() still lets the kernel deliver
            # what sits in the socket buffers, then sends the FIN.
            self._close(reset=False)
            return
        assert d.dst is not None
        with contextlib.suppress(OSError):
            d.dst.shutdown(socket.SHUT_WR)

    # -- endings --

    def shut(self, reason: str) -> None:
        """Close both sides on the proxy's own initiative (idle, drain, shutdown, rejects)."""
        if not self.closed:
            self.reason = reason
            self._close(reset=False)

    def _lost(self, exc: OSError, client: bool) -> None:
        if self.closed:
            return
        if self.backend is None:
            self.reason = CLIENT_GONE
        elif exc.errno in _RESET_ERRNOS:
            self.reason = CLIENT_RESET if client else BACKEND_RESET
        else:
            self.reason = self.reason or (CLIENT_CLOSED if client else BACKEND_CLOSED)
        self._close(reset=True)

    def _release(self) -> None:
        """Hook for engines that hold more per connection (the splice engine's pipes)."""

    def _close(self, reset: bool) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._release()
        for sock in (self.sock, self.upstream):
            if sock is None:
                continue
            self.poller.forget(sock.fileno())
            if reset:
                # RST rather than FIN, so a peer's reset is not passed on as a clean end.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self.pending = None
        self.owner.connection_closed(self)


class Server:
    """A listening socket; each accepted socket becomes a `conn_class` connection."""

    def __init__(
        self, owner: Owner, host: str, port: int, backlog: int, conn_class: type[Connection]
    ) -> None:
        self.owner = owner
        self.conn_class = conn_class
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
        self.poller = Poller.of(self.loop)
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    async def start_serving(self) -> None:
        if not self._serving and self.sock.fileno() >= 0:
            self._serving = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # bounded per wake-up, so one busy listener cannot starve the loop
            try:
                sock, peername = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.owner.accept_failed(exc)
                    self._shed()
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()  # reset before we got to it
                continue
            self.owner.connection_opened(self.conn_class(self.owner, sock, self.poller, peername))

    def _shed(self) -> None:
        """Out of descriptors: close the waiting clients at once (they hear a close now,
        rather than hang in the backlog), using the spare descriptor kept for this."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.sock.accept()[0].close()
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if self._spare is None:
            # Not even that: stop accepting for a moment instead of spinning.
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        if self._serving and self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._serving:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self._serving = False
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
