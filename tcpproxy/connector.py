"""Getting a client to a backend: pick one, connect within the connect timeout (resolving its
name first if it has one), retry on another when that fails, and count what the failure
costs the backend (its failures, passive ejection, the log line)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from tcpproxy import affinity, health, proxy_protocol, relay
from tcpproxy.admission import client_address
from tcpproxy.backend import LOCAL_RESOURCE_ERRNOS, SOURCE_PORT_ERRNOS, Backend
from tcpproxy.resolver import Resolver

if TYPE_CHECKING:
    from tcpproxy.admission import Rejections
    from tcpproxy.config import ListenerConfig
    from tcpproxy.pool import BackendPool
    from tcpproxy.relay import Connection

log = logging.getLogger("tcpproxy")

MAX_CONNECT_ATTEMPTS = 3
# At most one line per kind of local shortage, and one "panic" line, this often.
RESOURCE_LOG_INTERVAL_S = 5.0


def classify_connect_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    return "other"


def _client_key(conn: Connection) -> int | None:
    """The affinity key of the client: the PROXY header's source when the listener accepts
    one (admission sets `peer` from it), else the socket's peer; None when unknown."""
    address = client_address(conn.peer if conn.peer is not None else conn.peername)
    return affinity.client_key(address) if address is not None else None


class Connector:
    """Connecting is callbacks, not a coroutine: a Task per connection costs more CPU than
    the rest of the accept path (benchmarks/README.md). Only a name lookup runs as a Task."""

    def __init__(
        self,
        listener: str,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        pool: BackendPool,
        rejections: Rejections,
    ) -> None:
        self.listener = listener
        self.loop = loop
        self.config = config  # the listener's, replaced on each reload
        self.pool = pool
        self.rejections = rejections
        self.resolver = Resolver(loop.getaddrinfo, loop.time)
        self._last_exhausted_log: dict[str, float] = {}
        self._last_panic_log = -RESOURCE_LOG_INTERVAL_S

    def pick(self, conn: Connection, exclude: Sequence[Backend] = ()) -> Backend | None:
        """A backend for `conn` (by its client address with `balance: client_hash`)."""
        by_client = self.pool.affinity
        key = _client_key(conn) if by_client is not None else None
        choose: Callable[[Callable[[Backend], bool], Sequence[Backend]], Backend | None]
        if by_client is not None and key is not None:
            choose = partial(by_client.pick, key)
        else:
            choose = self.pool.balancer.pick
        backend = choose(Backend.eligible, exclude)
        if backend is None:
            # Passive ejection alone never empties a listener: when every candidate is
            # ejected (all refused for a moment, as in a rolling restart), trying them beats
            # refusing every client until the ejections expire.
            backend = choose(Backend.eligible_if_panicking, exclude)
            if backend is not None:
                self._log_panic()
        return backend

    def _log_panic(self) -> None:
        now = self.loop.time()
        if now - self._last_panic_log >= RESOURCE_LOG_INTERVAL_S:
            self._last_panic_log = now
            log.warning(
                "%s: every backend with weight is ejected: sending new connections to them anyway",
                self.listener,
                extra={"listener": self.listener, "reason": "panic"},
            )

    def start(self, conn: Connection) -> None:
        backend = self.pick(conn)
        if backend is None:
            self.rejections.reject(conn, "no_backend")
            return
        self._attempt(conn, backend)

    def _attempt(self, conn: Connection, backend: Backend) -> None:
        # From here the connection is the backend's, connected or not (drain, shutdown and
        # /status see it there), until it closes or a retry takes it to another.
        self.pool.assign(conn, backend)
        conn.timer = self.loop.call_later(
            self.config.connect_timeout, self._connect_timed_out, conn
        )
        if not backend.literal:
            conn.connect_task = self.loop.create_task(self._resolve_and_connect(conn, backend))
            return
        try:
            conn.connect(backend.host, backend.port)
        except OSError as exc:
            self.failed(conn, exc)

    async def _resolve_and_connect(self, conn: Connection, backend: Backend) -> None:
        try:
            host = await self.resolver.next_address(backend.host, backend.port)
            conn.connect_task = None
            conn.connect(host, backend.port)
        except OSError as exc:
            conn.connect_task = None
            self.failed(conn, exc)

    def _connect_timed_out(self, conn: Connection) -> None:
        conn.timer = None
        if conn.connect_task is not None:
            conn.connect_task.cancel()
            conn.connect_task = None
        conn.abort_connect()
        self.failed(conn, TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def failed(self, conn: Connection, exc: OSError) -> None:
        """An attempt failed: try the next backend (never one that failed), up to
        MAX_CONNECT_ATTEMPTS in all."""
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        target = conn.target
        assert target is not None
        if exc.errno in SOURCE_PORT_ERRNOS:
            # Out of local ports for this backend's address: not its fault, so nothing is
            # held against it; another backend's address has ports of its own.
            self.resource_exhausted(exc, f"connect to {target.name} ({target.address})")
            conn.tried += (target,)
            candidate = self.pick(conn, conn.tried)
        elif exc.errno in LOCAL_RESOURCE_ERRNOS:
            # Out of file descriptors or memory here: not the backend's fault, so no
            # failure is held against it, and another backend would fail the same way.
            self.resource_exhausted(exc, "open a backend connection")
            candidate = None
        else:
            self._count_failure(target, classify_connect_error(exc))
            conn.tried += (target,)
            candidate = self.pick(conn, conn.tried)
        if candidate is None or len(conn.tried) >= MAX_CONNECT_ATTEMPTS:
            self.rejections.count("connect_failed")
            conn.shut(relay.CONNECT_FAILED)
            return
        self._attempt(conn, candidate)

    def _count_failure(self, target: Backend, reason: str) -> None:
        target.connect_failures[reason] += 1
        health.connect_failed(self.listener, target, self.config.ejection, self.loop)
        log.warning(
            "connect to %s/%s (%s) failed: %s",
            self.listener,
            target.name,
            target.address,
            reason,
            extra={"listener": self.listener, "backend": target.name, "reason": reason},
        )

    def resource_exhausted(self, exc: OSError, doing: str) -> None:
        """Log a shortage of this host's (at most a line per kind every few seconds)."""
        if exc.errno in SOURCE_PORT_ERRNOS:
            kind = "ports"
            advice = "out of local ports: widen net.ipv4.ip_local_port_range, or add backends"
        else:
            kind = "resources"
            advice = "raise the open files limit, or lower max_connections"
        now = self.loop.time()
        if now - self._last_exhausted_log.get(kind, -RESOURCE_LOG_INTERVAL_S) >= (
            RESOURCE_LOG_INTERVAL_S
        ):
            self._last_exhausted_log[kind] = now
            log.error(
                "%s: cannot %s: %s (%s)",
                self.listener,
                doing,
                os.strerror(exc.errno or 0),
                advice,
                extra={"listener": self.listener, "reason": kind},
            )

    def established(self, conn: Connection) -> None:
        """The connect completed: `conn` is connected to the backend it was picked for."""
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        backend = conn.target
        assert backend is not None
        conn.backend = backend
        backend.total += 1
        backend.failure_streak = 0
        pp = self.config.proxy_protocol
        if pp is not None and pp.send:
            # Before any client byte (the client's early bytes are written after this).
            peer = conn.peer
            local = conn.local or conn.sockname()
            if isinstance(peer, tuple) and isinstance(local, tuple):
                conn.write_first(proxy_protocol.build(pp.send, peer[:2], local[:2]))
