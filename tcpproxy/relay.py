"""The copy engine: two asyncio Protocols that pump bytes between a client and its backend.

Why Protocols and not streams: no task per connection, no await per chunk, and flow control
is the transports' own (pause_writing on one side pauses reading on the other), so memory per
connection is bounded by the write-buffer limits whatever the peers send.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from functools import partial
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from tcpproxy.connections import Backend

# Above this much unsent data in a transport, the other side stops reading (and resumes below
# the low mark). Together with the kernel's socket buffers this bounds memory per connection.
WRITE_HIGH_WATER_BYTES = 256 * 1024
WRITE_LOW_WATER_BYTES = 64 * 1024
# After both sides' FINs, how long a slow reader gets to take the bytes still buffered for it.
FLUSH_TIMEOUT_S = 60.0
# Client bytes held while the backend connection is being set up; past this, stop reading.
PRECONNECT_BUFFER_BYTES = 256 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)

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

    def connection_opened(self, conn: ClientSide) -> None: ...
    def connection_established(self, conn: ClientSide) -> None: ...
    def header_received(self, conn: ClientSide) -> None: ...
    def connection_closed(self, conn: ClientSide) -> None: ...


def _reset(transport: asyncio.Transport) -> None:
    """Close with RST rather than FIN, so a peer's reset is not passed on as a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class ConnectionRecord:
    """What the listener knows of a proxied connection, whichever engine moves its bytes."""

    __slots__ = (
        "awaiting_header",
        "backend",
        "bytes_down",
        "bytes_up",
        "closed",
        "connect_task",
        "connect_timed_out",
        "idle_mark",
        "idle_since",
        "local",
        "opened_at",
        "owner",
        "peer",
        "pending",
        "pending_bytes",
        "reason",
    )

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.backend: Backend | None = None
        self.pending: list[bytes] | None = None  # client bytes before the backend is up
        self.pending_bytes = 0
        self.connect_task: asyncio.Task[None] | None = None
        self.connect_timed_out = False
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


class ClientSide(ConnectionRecord, asyncio.Protocol):
    """The copy engine's accepted connection; also the record of the connection as a whole."""

    __slots__ = ("client_eof", "transport", "upstream", "upstream_eof")

    def __init__(self, owner: Owner) -> None:
        super().__init__(owner)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.upstream: asyncio.Transport | None = None
        self.client_eof = False
        self.upstream_eof = False

    # -- client transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        self.owner.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            self.bytes_up += len(data)
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= PRECONNECT_BUFFER_BYTES:
            self.transport.pause_reading()
        if self.awaiting_header:
            self.owner.header_received(self)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream is not None:
            self.reason = self.reason or CLIENT_CLOSED
            self.upstream.write_eof()
            if self.upstream_eof:
                self._finish()
        # Keep our sending half open: the backend may still answer after the client's FIN.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self.upstream is None:
            self.reason = CLIENT_GONE
        elif exc is not None:
            self.reason = CLIENT_RESET
        else:
            self.reason = self.reason or CLIENT_CLOSED
        self._close(reset=exc is not None)

    def pause_writing(self) -> None:
        # The client reads slower than the backend sends: stop reading from the backend.
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- called by the listener and by UpstreamSide --

    async def open_upstream(self, backend: Backend, host: str, port: int) -> None:
        """Connect to the backend; attach() runs from the new transport's connection_made."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(partial(UpstreamSide, self, backend), host, port)

    def write_first(self, data: bytes) -> None:
        """Bytes for the backend before any client byte (a PROXY header)."""
        assert self.upstream is not None
        self.upstream.write(data)

    def buffered_bytes(self) -> int:
        """Bytes held in user space for this connection (both write buffers, early bytes)."""
        upstream = self.upstream.get_write_buffer_size() if self.upstream is not None else 0
        return self.transport.get_write_buffer_size() + upstream + self.pending_bytes

    def attach(self, backend: Backend, upstream: asyncio.Transport) -> None:
        """The backend connection is up: flush what the client sent meanwhile, start relaying."""
        if self.closed:
            upstream.close()
            return
        self.backend = backend
        self.upstream = upstream
        upstream.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        self.owner.connection_established(self)
        if self.pending is not None:
            for chunk in self.pending:
                upstream.write(chunk)
            self.bytes_up += self.pending_bytes
            paused = self.pending_bytes >= PRECONNECT_BUFFER_BYTES
            self.pending = None
            self.pending_bytes = 0
            # If the flush itself filled the backend's buffer, resume_writing will resume us.
            if paused and upstream.get_write_buffer_size() < WRITE_HIGH_WATER_BYTES:
                self.transport.resume_reading()
        if self.client_eof:
            self.reason = CLIENT_CLOSED
            upstream.write_eof()

    def upstream_eof_received(self) -> None:
        self.upstream_eof = True
        self.reason = self.reason or BACKEND_CLOSED
        self.transport.write_eof()
        if self.client_eof:
            self._finish()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.reason = BACKEND_RESET if exc is not None else (self.reason or BACKEND_CLOSED)
        self._close(reset=exc is not None)

    def shut(self, reason: str) -> None:
        """Close both sides on the proxy's own initiative (idle, drain, shutdown, no backend)."""
        if self.closed:
            return
        self.reason = reason
        self._close(reset=False)

    def _finish(self) -> None:
        # Both sides sent FIN and we passed each on: every byte still buffered is owed to its
        # reader, so close only after the buffers are flushed (close() does that), and give
        # up on a reader that takes longer than FLUSH_TIMEOUT_S.
        self._close(reset=False, flush=True)

    def _close(self, reset: bool, flush: bool = False) -> None:
        self.closed = True
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        for transport in (self.transport, self.upstream):
            if transport is None or transport.is_closing():
                continue
            if reset:
                _reset(transport)
            elif not transport.get_write_buffer_size():
                transport.close()
            elif flush:
                transport.close()
                asyncio.get_running_loop().call_later(FLUSH_TIMEOUT_S, transport.abort)
            else:
                # Closed on the proxy's own initiative (drain deadline, idle, shutdown): a
                # peer that stopped reading must not hold the connection open.
                transport.abort()
        self.pending = None
        self.owner.connection_closed(self)


class UpstreamSide(asyncio.Protocol):
    """The backend connection; forwards everything to its ClientSide."""

    __slots__ = ("backend", "conn")

    def __init__(self, conn: ClientSide, backend: Backend) -> None:
        self.conn = conn
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.attach(self.backend, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        # The hot path: inlined rather than a call into ClientSide.
        conn = self.conn
        conn.transport.write(data)
        conn.bytes_down += len(data)

    def eof_received(self) -> bool:
        self.conn.upstream_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_lost(exc)

    def pause_writing(self) -> None:
        # The backend reads slower than the client sends: stop reading from the client.
        self.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.conn.transport.resume_reading()
