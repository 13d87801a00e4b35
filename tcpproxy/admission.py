"""Admitting an accepted client: the max_connections limits (the listener's, and one client
address's), and the wait for its PROXY protocol header (when the listener requires one)
before any backend is picked for it."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tcpproxy import proxy_protocol

if TYPE_CHECKING:
    from tcpproxy.config import ListenerConfig
    from tcpproxy.metrics import Metrics
    from tcpproxy.relay import Connection

log = logging.getLogger("tcpproxy")

REJECT_REASONS = (
    "no_backend",
    "max_connections",
    "connect_failed",
    "proxy_protocol",
    "max_connections_per_client",
)
# At most one "client has too many connections" line this often.
CLIENT_LIMIT_LOG_INTERVAL_S = 5.0


def client_address(peer: object) -> str | None:
    """The address a client is counted under for max_connections_per_client: the IP of its
    (host, port, ...) address; None when there is none (a socket that reset before it
    could be asked)."""
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return None


class Rejections:
    """Clients the listener turned away, counted by reason."""

    def __init__(self, listener: str, metrics: Metrics) -> None:
        self._counters = {
            reason: metrics.rejected.labels(listener, reason) for reason in REJECT_REASONS
        }

    def count(self, reason: str) -> None:
        self._counters[reason].inc()

    def reject(self, conn: Connection, reason: str) -> None:
        self.count(reason)
        conn.shut("rejected_" + reason)


class Admission:
    """Decides what happens to a client as it is accepted. Clients waiting for their PROXY
    header have no backend yet: they are the listener's own connections (`waiting`)."""

    def __init__(
        self,
        listener: str,
        loop: asyncio.AbstractEventLoop,
        config: ListenerConfig,
        rejections: Rejections,
    ) -> None:
        self.listener = listener
        self.loop = loop
        self.config = config  # the listener's, replaced on each reload
        self.rejections = rejections
        self.waiting: set[Connection] = set()
        # Open connections per client address, and the address each was counted under.
        self.per_client: dict[str, int] = {}
        self._counted: dict[Connection, str] = {}
        self._last_limit_log = -CLIENT_LIMIT_LOG_INTERVAL_S

    def admit(self, conn: Connection, open_connections: int) -> bool:
        """True: pick a backend and connect now. False: rejected, or waiting for a header."""
        config = self.config
        if open_connections > config.max_connections:
            self.rejections.reject(conn, "max_connections")
            return False
        pp = config.proxy_protocol
        if pp is not None and pp.accept:
            # Nothing is connected until the client's PROXY header is in, within the connect
            # timeout: a client that never sends one cannot hold a backend connection.
            conn.await_header()
            self.waiting.add(conn)
            conn.timer = self.loop.call_later(config.connect_timeout, self._timed_out, conn)
            return False
        if not self._count_client(conn, conn.peername):
            return False
        if pp is not None and pp.send and conn.peer is None:
            conn.peer = conn.peername
        return True

    def _count_client(self, conn: Connection, peer: object) -> bool:
        """Count `conn` under its client's address; False (rejected) when that address
        already holds max_connections_per_client. Counted even with no limit, so that a
        reload that sets one finds the right numbers."""
        address = client_address(peer)
        if address is None:
            return True
        held = self.per_client.get(address, 0)
        limit = self.config.client_connection_limit
        if limit and held >= limit:
            self._log_limit(address, held, limit)
            self.rejections.reject(conn, "max_connections_per_client")
            return False
        self.per_client[address] = held + 1
        self._counted[conn] = address
        return True

    def _log_limit(self, address: str, held: int, limit: int) -> None:
        now = self.loop.time()
        if now - self._last_limit_log >= CLIENT_LIMIT_LOG_INTERVAL_S:
            self._last_limit_log = now
            log.warning(
                "%s: client %s has %d connections open (max_connections_per_client %d): "
                "closing its new ones",
                self.listener,
                address,
                held,
                limit,
                extra={"listener": self.listener, "reason": "max_connections_per_client"},
            )

    def header_received(self, conn: Connection) -> bool:
        """Client bytes (or its FIN) arrived while waiting: True once the whole header is in
        (the client and its address are then set from it, and the bytes after it kept for
        the backend). A FIN before the header is complete rejects the client at once."""
        data = b"".join(conn.pending or ())
        try:
            header = proxy_protocol.parse(data, eof=conn.up.eof)
        except proxy_protocol.ProxyProtocolError as exc:
            log.info(
                "%s: closing a client: %s", self.listener, exc, extra={"listener": self.listener}
            )
            self.rejections.reject(conn, "proxy_protocol")
            return False
        if header is None:
            return False
        conn.header_done()
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self.waiting.discard(conn)
        rest = data[header.length :]
        conn.pending = [rest] if rest else None
        conn.pending_bytes = len(rest)
        conn.peer = header.source or conn.peername
        conn.local = header.destination
        # The client is the one the header names (the load balancer's own connections,
        # PROXY LOCAL, count under its address).
        return self._count_client(conn, conn.peer)

    def _timed_out(self, conn: Connection) -> None:
        conn.timer = None
        self.rejections.reject(conn, "proxy_protocol")

    def discard(self, conn: Connection) -> None:
        """`conn` closed (it may have been waiting for its header)."""
        self.waiting.discard(conn)
        address = self._counted.pop(conn, None)
        if address is not None:
            held = self.per_client[address] - 1
            if held:
                self.per_client[address] = held
            else:
                del self.per_client[address]
