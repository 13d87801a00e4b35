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

What a connection does at a FIN, a reset or the proxy's own close is decided in lifecycle.py;
this module moves the bytes and reports what happened. The epoll set is poller.py's, the
listening socket acceptor.py's.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import select
import socket
import struct
import termios
from typing import TYPE_CHECKING, Protocol

from tcpproxy.lifecycle import Action, Event, State, is_connected, transition
from tcpproxy.poller import BUFFER_BYTES, Poller

if TYPE_CHECKING:
    from tcpproxy.backend import Backend

log = logging.getLogger("tcpproxy")

# The C socket type: socket.socket's Python wrapper (its __init__, accept, close, and the
# family and type properties) costs more per connection than the syscalls it makes.
Socket = _socket.socket

# One read; also the most a direction holds in user space while its destination is full.
READ_CHUNK_BYTES = BUFFER_BYTES
# Client bytes held while the backend connection is being set up; past this, stop reading
# (the kernel holds the rest). Enough for any greeting and a PROXY header.
PRECONNECT_BUFFER_BYTES = 16 * 1024

# Reads per wake-up before other connections get a turn.
PUMP_ROUNDS = 4
# A taking read's size, and so the most a direction holds while dst is full. A read that
# fills it switches that direction to look-first reads of READ_CHUNK_BYTES (_pump).
SMALL_READ_BYTES = 16 * 1024
# After a peer's reset, how long its last bytes may take to reach the other peer before that
# one is reset too, and how often the wait looks (there is no event for "acknowledged").
LAST_BYTES_MAX_S = 5.0
LAST_BYTES_POLL_MAX_S = 0.05

_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_READABLE = select.EPOLLIN | _HANGUP
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_ERROR = select.EPOLLERR
_FAILED = select.EPOLLERR | select.EPOLLHUP
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT})
_INT = b"\0" * 4
_RELAYING = frozenset({State.ESTABLISHED, State.CLIENT_HALF_CLOSED, State.BACKEND_HALF_CLOSED})

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
INTERNAL_ERROR = "internal_error"  # a bug in the proxy ended it (logged with a traceback)
ADMIN_CLOSED = "admin_closed"  # ended through the admin API (DELETE /connections)

# Connection ids: unique in the process and increasing, so an id names one connection for
# good (never a later one) and id order is age order.
_ids = itertools.count(1)


def _queued(sock: Socket, request: int) -> int:
    """Bytes in a socket's receive queue (FIONREAD) or send queue, unacknowledged included
    (TIOCOUTQ); 0 for a socket that has none or is gone."""
    fd = sock.fileno()
    if fd < 0:  # closed (the side that reset, while the other gets its last bytes)
        return 0
    try:
        value: int = struct.unpack("i", fcntl.ioctl(fd, request, _INT))[0]
    except OSError:
        return 0
    return value


class Owner(Protocol):
    """What a connection reports to (the listener)."""

    name: str

    def connection_opened(self, conn: Connection) -> None: ...
    def connection_established(self, conn: Connection) -> None: ...
    def connect_failed(self, conn: Connection, exc: OSError) -> None: ...
    def accept_failed(self, exc: OSError) -> None: ...
    def header_received(self, conn: Connection) -> None: ...
    def connection_closed(self, conn: Connection) -> None: ...


class Direction:
    """One way: src socket -> dst socket. Byte-level facts only; what the connection does
    about them is its lifecycle state."""

    __slots__ = (
        "blocked",
        "bulk",
        "dst",
        "eof",
        "hup",
        "in_pipe",
        "pipe",
        "ready",
        "rest",
        "src",
        "upstream",
    )

    def __init__(self, src: Socket, dst: Socket | None, upstream: bool) -> None:
        self.src = src
        self.dst = dst  # None until the backend is up (client -> backend)
        self.upstream = upstream  # client -> backend
        # Edge-triggered: src may have bytes (or its FIN) we have not read yet.
        self.ready = False
        self.hup = False  # src's FIN or error was signalled: read on until it shows
        # Read from src, not yet taken by dst (a memoryview after a partial write, so that
        # a slow reader costs no copy per write).
        self.rest: bytes | memoryview = b""
        self.pipe: tuple[int, int] | None = None  # the splice engine's
        self.in_pipe = 0  # bytes in that pipe
        self.eof = False  # src sent FIN (or is gone): never read again
        # Reads fill the small size: look before taking (copy engine, see Connection._pump).
        self.bulk = False
        # dst did not take all that was looked at: wait for its writable event.
        self.blocked = False


class Connection:
    """A proxied connection: the client socket, its backend socket, its lifecycle state,
    and what the listener keeps about it (byte counts, end reason, its backend)."""

    __slots__ = (
        "backend",
        "bytes_down",
        "bytes_up",
        "connect_task",
        "deadline",
        "down",
        "id",
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
        "state",
        "target",
        "timer",
        "tried",
        "up",
        "upstream",
    )

    def __init__(self, owner: Owner, sock: Socket, poller: Poller, peername: object = None) -> None:
        self.id = next(_ids)
        self.owner = owner
        self.poller = poller
        self.loop = poller.loop
        self.sock = sock
        self.state = State.ACCEPTED
        # From accept(): getpeername() fails once a client has already reset.
        self.peername = peername
        self.upstream: Socket | None = None  # the backend socket, once connecting
        # The listener's: the backend picked (kept through retries) and the one connected.
        self.target: Backend | None = None
        self.backend: Backend | None = None
        self.up = Direction(sock, None, upstream=True)
        self.down: Direction | None = None
        self.tried: tuple[Backend, ...] = ()  # the listener's: backends that failed to connect
        self.pending: list[bytes] | None = None  # client bytes before the backend is up
        self.pending_bytes = 0
        # The connect timeout (or the PROXY header wait; while closing, the delivery wait),
        # and a name lookup in progress.
        self.timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # while closing: when the last bytes stop being waited for
        self.bytes_up = 0
        self.bytes_down = 0
        # The idle sweep's bookkeeping (activity_mark at the last sweep, and since when).
        # None: no sweep has looked yet (any number could be a first mark: a SYN in flight
        # counts one byte queued, so a fresh connection's mark can be -1).
        self.idle_mark: int | None = None
        self.idle_since = 0.0
        self.opened_at = 0.0
        self.peer: object = None
        self.local: object = None  # the address the client reached, from a PROXY header
        self.reason: str | None = None
        poller.watch(sock.fileno(), self._on_client)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def relaying(self) -> bool:
        """Bytes flow both ways as usual (not before the backend is up, nor once ending)."""
        return self.state in _RELAYING

    # -- what the listener asks of a connection --

    def await_header(self) -> None:
        """Hold the client's bytes until a PROXY protocol header is in (header_received)."""
        self._event(Event.AWAIT_HEADER)

    def header_done(self) -> None:
        """The header is in; the next step is connect() (or shut())."""

    def activity_mark(self) -> int:
        """A number that grows whenever bytes move either way, read or written on, for the
        idle sweep to compare between sweeps (so the data path pays nothing for it). A read
        counts, and so does each byte the peer takes: held here, then queued in the kernel,
        then acknowledged, so a slow reader that keeps reading is never idle."""
        moved = self.bytes_up + self.bytes_down + self.pending_bytes
        mark = 2 * moved - self.buffered_bytes()
        for sock in (self.sock, self.upstream):
            if sock is not None:
                mark -= _queued(sock, termios.TIOCOUTQ)
        return mark

    def sockname(self) -> object:
        try:
            return self.sock.getsockname()
        except OSError:
            return None

    # -- the lifecycle: every change of state goes through here --

    def _event(self, event: Event, holding: bool = False) -> None:
        self.state, action = transition(self.state, event, holding)
        if action is Action.NONE:
            return
        if action is Action.FIN_TO_BACKEND or action is Action.FIN_TO_CLIENT:
            sock = self.upstream if action is Action.FIN_TO_BACKEND else self.sock
            assert sock is not None
            try:  # noqa: SIM105 (suppress() costs a context manager per connection)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # a reset meanwhile: its error event follows
        elif action is Action.CLOSE or action is Action.RESET:
            self._close(reset=action is Action.RESET)
        else:
            assert self.down is not None
            self._deliver(self.up if action is Action.DELIVER_TO_BACKEND else self.down)

    # -- events --

    def _on_client(self, events: int) -> None:
        if events & _ERROR and self._socket_error(client=True):
            return
        down = self.down
        if events & _WRITABLE and down is not None and (down.rest or down.in_pipe or down.blocked):
            self._flush(down)
            if not self.relaying:
                return
        if events & _READABLE:
            up = self.up
            up.ready = True
            if events & _HANGUP:
                up.hup = True
            if up.dst is None:
                if not up.eof:
                    self._read_early()
            elif not (up.rest or up.in_pipe or up.eof or up.blocked):
                self._pump(up)

    def _on_upstream(self, events: int) -> None:
        down = self.down
        if down is None:
            if events & _WRITABLE:
                self._connected(events)
            return
        if events & _ERROR and self._socket_error(client=False):
            return
        up = self.up
        if events & _WRITABLE and (up.rest or up.in_pipe or up.blocked):
            self._flush(up)
            if not self.relaying:
                return
        if events & _READABLE:
            down.ready = True
            if events & _HANGUP:
                down.hup = True
            if not (down.rest or down.in_pipe or down.eof or down.blocked):
                self._pump(down)

    def _socket_error(self, client: bool) -> bool:
        """An error event: a reset (or worse) on that side. Checked first and whatever else
        the connection is doing: after a FIN no read would come to find it (edge-triggered),
        and a write that fails first must not hide the peer's last bytes."""
        sock = self.sock if client else self.upstream
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            return False
        self._lost(OSError(err, os.strerror(err)), client)
        return True

    # -- connecting (the listener picks the backend, retries and times out) --

    def connect(self, host: str, port: int) -> None:
        """Start a non-blocking connect; the owner hears connection_established or
        connect_failed. Raises OSError when it fails at once (refused, out of fds)."""
        if self.closed:
            return  # ended while a name was looked up
        self._event(Event.CONNECT)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = Socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
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
        if sock is not None and self.state is State.CONNECTING:
            self.upstream = None
            self.poller.forget(sock.fileno())
            sock.close()

    def _connected(self, events: int) -> None:
        sock = self.upstream
        assert sock is not None
        # A failed connect always signals an error or a hang-up; only then is there an
        # error to read (a syscall saved per connection).
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & _FAILED else 0
        if err:
            self.abort_connect()
            self.owner.connect_failed(self, OSError(err, f"connect: {errno.errorcode[err]}"))
            return
        self._event(Event.CONNECTED)
        if self.backend is None:
            self.backend = self.target
        up = self.up
        up.dst = sock
        self.down = down = Direction(sock, self.sock, upstream=False)
        # The backend may have spoken already (a greeting): edge-triggered, so this event
        # is the only word of it.
        down.ready = bool(events & _READABLE)
        down.hup = bool(events & _HANGUP)
        self.owner.connection_established(self)
        if not self.relaying:
            return
        if self.pending:
            early = b"".join(self.pending)
            # After a PROXY header the socket did not take whole (write_first).
            up.rest = bytes(up.rest) + early if up.rest else early
            self.bytes_up += self.pending_bytes
            self.pending = None
            self.pending_bytes = 0
        if up.rest:
            self._flush(up)
        elif up.eof:
            self._pass_fin(up)
        elif up.ready:
            self._pump(up)
        if not self.closed and down.ready:
            self._pump(down)

    def write_first(self, data: bytes) -> None:
        """Bytes for the backend before any client byte (a PROXY header). A fresh socket
        takes them whole; what it does not is held and written before the client's bytes."""
        assert self.upstream is not None
        try:
            sent = self.upstream.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc, client=False)
            return
        self.up.rest = data[sent:]

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
        if (got or up.eof) and self.state is State.AWAITING_HEADER:
            # A FIN too: the listener must not wait for a header that can no longer come.
            self.owner.header_received(self)

    # -- the data path --

    def _pump(self, d: Direction) -> None:
        """src has bytes: read and write them on at once, until src is empty or dst full.

        A small read takes the bytes; a stream that fills small reads is read by looking
        first (MSG_PEEK) and then taking only what dst took (MSG_TRUNC: no copy), so a full
        dst leaves them in src's kernel queue rather than here. Held per direction: at most
        one small read, whatever the speeds."""
        assert d.dst is not None
        poller = self.poller
        buffer = poller.buffer
        view = poller.view
        src = d.src
        for _ in range(PUMP_ROUNDS):
            peek = d.bulk
            limit = READ_CHUNK_BYTES if peek else SMALL_READ_BYTES
            try:
                n = src.recv_into(buffer, limit, socket.MSG_PEEK if peek else 0)
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
            # A short read took all there was; after src's FIN (hup) that is its last
            # bytes, so no read is needed to find the FIN once they are written.
            last = n < limit
            if last:
                d.ready = False
            if not peek:
                if d.upstream:
                    self.bytes_up += n
                else:
                    self.bytes_down += n
                if last and d.hup:
                    d.eof = True  # passed on once these bytes are written (_flush)
                if last and poller.dispatching:
                    # A small read, all there was: write it with the rest of the batch's writes.
                    d.rest = view[:n].tobytes()
                    poller.writes.append((self, d))
                    return
            try:
                sent = d.dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(exc, client=not d.upstream)
                return
            if peek:
                if sent:
                    src.recv_into(buffer, sent, socket.MSG_TRUNC)  # take what dst took
                    if d.upstream:
                        self.bytes_up += sent
                    else:
                        self.bytes_down += sent
                if sent < n:
                    # dst is full; the rest waits in src. dst's writable event goes on.
                    d.ready = True
                    d.blocked = True
                    return
                d.bulk = n >= SMALL_READ_BYTES
                if last and d.hup:
                    d.eof = True
            else:
                d.bulk = True if sent < n else n == SMALL_READ_BYTES
                if sent < n:
                    # dst is full: keep the rest (one small read at most); its next
                    # writable event goes on from there.
                    d.rest = view[sent:n].tobytes()
                    return
            if last:
                if d.eof:
                    self._pass_fin(d)
                return
        # Still more: let other connections run first.
        self.loop.call_soon(self._resume, d)

    def flush_batched(self, d: Direction) -> None:
        """The poller's end of batch: write what a small read left for it."""
        if d.rest and self.state is not State.CLOSED:
            self._flush(d)

    def _resume(self, d: Direction) -> None:
        if d.ready and not (
            self.state is State.CLOSED or d.rest or d.in_pipe or d.eof or d.blocked
        ):
            try:
                self._pump(d)
            except Exception as exc:  # not under the poller's guard: the same rule
                self.fail(exc)

    def _flush(self, d: Direction) -> None:
        """dst is writable: write what it did not take before, then go on reading src."""
        assert d.dst is not None
        if d.blocked:
            d.blocked = False  # nothing held: the bytes dst did not take are still in src
            if d.ready and not d.eof:
                self._pump(d)
            return
        rest = d.rest
        try:
            sent = d.dst.send(rest)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc, client=not d.upstream)
            return
        if sent < len(rest):
            # Slicing a memoryview copies nothing: a slow reader costs no copy per write.
            d.rest = (rest if isinstance(rest, memoryview) else memoryview(rest))[sent:]
            return
        d.rest = b""
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

    def undelivered_bytes(self) -> int:
        """Bytes received from a peer and not yet passed on: held here, or still in a
        socket's receive queue (where a full destination leaves them)."""
        held = self.buffered_bytes()
        for sock in (self.sock, self.upstream):
            if sock is not None:
                held += _queued(sock, termios.FIONREAD)
        return held

    def _pass_fin(self, d: Direction) -> None:
        """src sent FIN and every byte before it is written to dst."""
        if self.state is State.CLOSING:
            return  # the delivery wait (_closing_tick) sees it
        if self.reason is None:
            self.reason = CLIENT_CLOSED if d.upstream else BACKEND_CLOSED
        self._event(Event.CLIENT_DONE if d.upstream else Event.BACKEND_DONE)

    # -- a peer's reset: deliver its last bytes to the other, then reset that one --

    def _take_pipe(self, d: Direction) -> bytes:
        """Hook: the bytes an engine holds for d outside `rest` (the splice engine's pipe)."""
        return b""

    def _deliver(self, d: Direction) -> None:
        """d's src reset. Linux still returns what it sent before the reset: read it all,
        close that side, and write it to dst; _closing_tick resets dst once it is there."""
        gone, survivor = d.src, d.dst
        assert survivor is not None
        other = self.down if d.upstream else self.up
        assert other is not None
        # Nothing more goes to the side that is gone.
        other.eof = True
        other.rest = b""
        other.blocked = d.blocked = False
        self._drop_pipe(other)
        held = [bytes(d.rest), self._take_pipe(d)]
        while not d.eof:
            try:
                data = gone.recv(READ_CHUNK_BYTES)
            except OSError:
                break
            if not data:
                break
            held.append(data)
            if d.upstream:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
        d.eof = True
        d.ready = False
        d.rest = b"".join(held)
        self.poller.forget(gone.fileno())
        with contextlib.suppress(OSError):
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        gone.close()
        self.deadline = self.loop.time() + LAST_BYTES_MAX_S
        if d.rest:
            self._flush(d)
        if self.state is State.CLOSING:
            self._closing_tick(d, 0.001)

    def _drop_pipe(self, d: Direction) -> None:
        """Hook: give up what an engine holds for d outside `rest`."""

    def _closing_tick(self, d: Direction, wait: float) -> None:
        self.timer = None
        if self.state is not State.CLOSING:
            return
        assert d.dst is not None
        delivered = not (d.rest or d.in_pipe) and _queued(d.dst, termios.TIOCOUTQ) == 0
        if delivered or self.loop.time() >= self.deadline:
            self._event(Event.DELIVERED)
            return
        self.timer = self.loop.call_later(
            wait, self._closing_tick, d, min(wait * 2, LAST_BYTES_POLL_MAX_S)
        )

    # -- endings --

    def shut(self, reason: str) -> None:
        """End both sides on the proxy's own initiative (idle, drain, shutdown, rejects): a
        FIN when nothing is lost by it, else a reset."""
        if self.state is not State.CLOSED:
            self.reason = reason
            self._event(Event.SHUT, self.undelivered_bytes() > 0)

    def fail(self, exc: BaseException) -> None:
        """A bug in a handler: reset this connection rather than leave it stalled."""
        picked = self.backend or self.target
        backend = picked.name if picked is not None else None
        log.error(
            "%s: resetting a connection from %s to %s after an internal error",
            self.owner.name,
            self.peername,
            backend or "-",
            exc_info=exc,
            extra={"listener": self.owner.name, "backend": backend},
        )
        if self.state is not State.CLOSED:
            self.reason = INTERNAL_ERROR
            self._event(Event.FAIL)

    def _lost(self, exc: OSError, client: bool) -> None:
        if self.closed:
            return
        if not is_connected(self.state):
            self.reason = CLIENT_GONE
        elif self.state is State.CLOSING:
            pass  # the first reset named the end
        elif exc.errno in _RESET_ERRNOS:
            self.reason = CLIENT_RESET if client else BACKEND_RESET
        else:
            self.reason = self.reason or (CLIENT_CLOSED if client else BACKEND_CLOSED)
        self._event(Event.CLIENT_RESET if client else Event.BACKEND_RESET)

    def _release(self) -> None:
        """Hook for engines that hold more per connection (the splice engine's pipes)."""

    def _close(self, reset: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._release()
        for sock in (self.sock, self.upstream):
            if sock is None or sock.fileno() < 0:  # none yet, or closed at a reset
                continue
            self.poller.forget(sock.fileno())
            if reset:
                # RST rather than FIN, so a peer's reset is not passed on as a clean end.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        self.pending = None
        self.owner.connection_closed(self)
