"""The admin server's connections: bounded in number, in time and in file descriptors.

aiohttp parses and answers the requests; the admin server accepts its connections itself, so
that no client can hold the port or the process's descriptors:

- a client has `read_timeout` to send a whole request, counted from connecting or from its
  previous answer; then the connection is closed (idle keep-alive connections too);
- at most `max_connections` are open. At the cap a new connection replaces the one that has
  waited longest for its request (a slow or idle client), so a probe still gets in while
  someone holds every slot; when all of them are in the middle of a request, the new one is
  closed at once;
- `SPARE_DESCRIPTORS` descriptors are held in reserve and given up one at a time to accept
  admin connections when the process has no other descriptor left (the data plane used them
  up): /livez and /readyz are answered instead of timing out, which would make the kubelet
  restart the pod and cut every pinned connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from aiohttp import web

log = logging.getLogger("tcpproxy")

SPARE_DESCRIPTORS = 8
BACKLOG = 128
# Accepts per wake-up: a flood of connections cannot hold the event loop.
ACCEPT_BATCH = 32
# Out of descriptors with no spare left: wait this long before trying to accept again.
ACCEPT_RETRY_S = 0.1
# Out of descriptors, a request line longer than this is not a probe.
STARVED_HEAD_BYTES = 2048
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

K = TypeVar("K")


class Slots(Generic[K]):
    """Which admin connections are open, and which one to close at the cap. Pure.

    A connection is *waiting* (for its next request: not yet sent, coming slowly, or idle
    after an answer) or *busy* (its request is being answered)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: dict[K, None] = {}  # oldest first
        self._busy: set[K] = set()

    def __len__(self) -> int:
        return len(self._waiting) + len(self._busy)

    @property
    def full(self) -> bool:
        return len(self) >= self.limit

    def open(self, key: K) -> None:
        self._waiting[key] = None

    def busy(self, key: K) -> None:
        if key in self._waiting:
            del self._waiting[key]
            self._busy.add(key)

    def idle(self, key: K) -> None:
        """Answered: waiting again, now the newest."""
        if key in self._busy:
            self._busy.discard(key)
            self._waiting[key] = None

    def close(self, key: K) -> None:
        self._waiting.pop(key, None)
        self._busy.discard(key)

    def victim(self) -> K | None:
        """At the cap: the connection to close to make room (the longest waiting), or None
        when every connection is busy and the new one must go instead."""
        return next(iter(self._waiting), None)


class SpareDescriptors:
    """Descriptors on /dev/null held so that some can be freed when the process has none."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._fds: list[int] = []
        self.refill()

    def __len__(self) -> int:
        return len(self._fds)

    def refill(self) -> None:
        while len(self._fds) < self.count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # still none free; the next close or accept tries again

    def release(self) -> bool:
        """Free one descriptor for the next accept; False when none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


class LogQuota:
    """At most `lines` log lines per `window_s`, and how many were held back."""

    def __init__(self, lines: int, window_s: float) -> None:
        self.lines = lines
        self.window_s = window_s
        self._window_start = -float("inf")
        self._used = 0
        self._held_back = 0

    def take(self) -> int | None:
        """None: do not log now. Otherwise log, and say how many lines were held back."""
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            self._window_start, self._used = now, 0
        if self._used >= self.lines:
            self._held_back += 1
            return None
        self._used += 1
        held_back, self._held_back = self._held_back, 0
        return held_back


def listening_socket(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class AdminConnection(asyncio.Protocol):
    """One admin connection: aiohttp's protocol inside the read deadline and the cap."""

    def __init__(self, owner: Connections, inner: asyncio.Protocol, peer: str) -> None:
        self.owner = owner
        self.inner = inner
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._doomed = False  # closed before its transport existed

    # -- asyncio.Protocol: forwarded to aiohttp --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        if self._doomed:
            self.close()
            return
        self.owner.connected(self)
        self.arm()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        try:
            self.inner.connection_lost(exc)
        finally:
            self.owner.lost(self)

    # -- the read deadline --

    def arm(self) -> None:
        self.disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.owner.read_timeout, self.close)

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self) -> None:
        """Close now; a reset if an answer is still unread (the client is not reading)."""
        self.disarm()
        transport = self.transport
        if transport is None:
            self._doomed = True
        elif transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


class Connections:
    """Every admin connection: the cap, the read deadlines, what each is doing."""

    def __init__(self, read_timeout: float, max_connections: int) -> None:
        self.read_timeout = read_timeout
        self.slots: Slots[AdminConnection] = Slots(max_connections)
        self._by_transport: dict[asyncio.BaseTransport, AdminConnection] = {}
        self.refused = 0  # new connections closed at once at the cap
        self.replaced = 0  # waiting connections closed to make room at the cap

    def admit(self, conn: AdminConnection) -> bool:
        """Room for `conn` (closing the longest-waiting connection at the cap)? False: close
        `conn` at once."""
        if self.slots.full:
            victim = self.slots.victim()
            if victim is None:
                self.refused += 1
                return False
            self.replaced += 1
            self.slots.close(victim)
            victim.close()
        self.slots.open(conn)
        return True

    def connected(self, conn: AdminConnection) -> None:
        assert conn.transport is not None
        self._by_transport[conn.transport] = conn

    def lost(self, conn: AdminConnection) -> None:
        self.slots.close(conn)
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A whole request has arrived: no deadline while it is answered."""
        conn = self._by_transport.get(transport) if transport is not None else None
        if conn is not None:
            conn.disarm()
            self.slots.busy(conn)

    def request_done(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._by_transport.get(transport) if transport is not None else None
        if conn is not None:
            self.slots.idle(conn)
            conn.arm()

    def __len__(self) -> int:
        return len(self.slots)


class AdminSite(web.BaseSite):
    """An aiohttp site on a listening socket whose connections this module accepts.

    Out of descriptors, a connection is accepted on a spare one and answered here, not by
    aiohttp: only the probes (`probes`: path -> (status, text)), everything else 503. Its
    socket is closed here, and the spare taken back in the same step, before the data
    plane could take the freed descriptor (a transport closes its socket later, in a
    callback of its own)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        conns: Connections,
        probes: Callable[[str], tuple[int, str] | None],
    ) -> None:
        super().__init__(runner)
        self.sock = sock
        self.conns = conns
        self.probes = probes
        self._loop = asyncio.get_running_loop()
        self._spares = SpareDescriptors(SPARE_DESCRIPTORS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._refusals = LogQuota(lines=1, window_s=10.0)
        self._starved = LogQuota(lines=1, window_s=10.0)

    @property
    def name(self) -> str:
        return f"http://{format_peer(self.sock.getsockname())}"

    async def start(self) -> None:
        await super().start()
        self._loop.add_reader(self.sock.fileno(), self._accept)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._spares.close()
        await super().stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self) -> None:
        self._spares.refill()  # if an earlier refill found no descriptor free
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # that client is gone (ECONNABORTED): the next one may be fine
                if not self._spares.release():
                    self._pause(exc)
                    return
                try:
                    sock, peer = self.sock.accept()
                except OSError:
                    self._spares.refill()
                    return
                self._log_starved(exc)
                self._spawn(self._answer_starved(sock))
                continue
            self._admit(sock, format_peer(peer))

    def _admit(self, sock: socket.socket, peer: str) -> None:
        server = self._runner.server
        assert server is not None
        conn = AdminConnection(self.conns, server(), peer)
        if not self.conns.admit(conn):
            sock.close()
            held_back = self._refusals.take()
            if held_back is not None:
                log.warning(
                    "admin server: closed a new connection from %s: all %d admin connections "
                    "are answering requests (--admin-max-connections)%s",
                    peer,
                    self.conns.slots.limit,
                    f"; {held_back} more since the last such line" if held_back else "",
                )
            return
        self._spawn(self._connect(conn, sock))

    async def _connect(self, conn: AdminConnection, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: conn, sock)
        except BaseException as exc:
            sock.close()
            self.conns.slots.close(conn)
            if not isinstance(exc, OSError):  # OSError: a client gone before it was set up
                raise

    async def _answer_starved(self, sock: socket.socket) -> None:
        """Answer a probe on a spare descriptor, then put the spare back."""
        try:
            sock.setblocking(False)
            head = await asyncio.wait_for(self._read_head(sock), self.conns.read_timeout)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0].decode("ascii", "replace")
            answer = self.probes(path) if method in (b"GET", b"HEAD") else None
            status, text = answer or (
                503,
                "out of file descriptors: only /livez and /readyz are answered\n",
            )
            body = text.encode()
            reason = {200: "OK", 503: "Service Unavailable"}.get(status, "")
            response = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            ).encode() + (body if method != b"HEAD" else b"")
            await asyncio.wait_for(self._loop.sock_sendall(sock, response), self.conns.read_timeout)
        except (OSError, TimeoutError, ValueError):
            pass  # the probe gave up or sent nonsense: nothing more to do for it
        finally:
            sock.close()
            self._spares.refill()  # in the same step: the freed descriptor is ours again

    async def _read_head(self, sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n" not in data:
            chunk = await self._loop.sock_recv(sock, STARVED_HEAD_BYTES - len(data))
            if not chunk or len(data) + len(chunk) >= STARVED_HEAD_BYTES:
                raise ValueError("no request line")
            data += chunk
        return data.partition(b"\r\n")[0]

    def _log_starved(self, exc: OSError) -> None:
        held_back = self._starved.take()
        if held_back is not None:
            log.warning(
                "admin server: out of file descriptors (%s): answering probes on spare "
                "descriptors; raise the open files limit (ulimit -n) or lower "
                "max_connections",
                exc.strerror,
            )

    def _pause(self, exc: OSError) -> None:
        held_back = self._starved.take()
        if held_back is not None:
            log.warning(
                "admin server: out of file descriptors (%s) and no spare one left; "
                "trying again every %.1f s",
                exc.strerror,
                ACCEPT_RETRY_S,
            )
        self._loop.remove_reader(self.sock.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept)
