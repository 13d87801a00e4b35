"""Admitting an accepted client: the max_connections limit, and the wait for its PROXY protocol
header (when the listener requires one) before any backend is picked for it."""

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

REJECT_REASONS = ("no_backend", "max_connections", "connect_failed", "proxy_protocol")


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
        if pp is not None and pp.send and conn.peer is None:
            conn.peer = conn.peername
        return True

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
        return True

    def _timed_out(self, conn: Connection) -> None:
        conn.timer = None
        self.rejections.reject(conn, "proxy_protocol")

    def discard(self, conn: Connection) -> None:
        """`conn` closed (it may have been waiting for its header)."""
        self.waiting.discard(conn)
