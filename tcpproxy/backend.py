"""Live backends: the object a connection is pinned to, its connections and its drain deadline."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from typing import TYPE_CHECKING

from tcpproxy.config import BackendConfig, split_host_port
from tcpproxy.table import BackendKey

if TYPE_CHECKING:
    from tcpproxy.relay import Connection

ACTIVE = "active"
ZERO = "zero"
DRAINING = "draining"
UNHEALTHY = "unhealthy"

CONNECT_FAILURE_REASONS = ("refused", "timeout", "dns", "other")
# Failures of this host, not of the backend: out of descriptors or memory, or out of local
# source ports for the backend's address (EADDRNOTAVAIL from connect; EADDRINUSE when the
# port picked is taken for that address). Never held against a backend: no failure counted,
# no ejection, no rollout judgement, no failed health check.
SOURCE_PORT_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})
LOCAL_RESOURCE_ERRNOS = (
    frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}) | SOURCE_PORT_ERRNOS
)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Backend:
    """One (listener, name, address). Connections hold this object, never the routing table,
    so a reload that reweights or removes the backend cannot move them."""

    __slots__ = (
        "address",
        "bytes_down_closed",
        "bytes_up_closed",
        "connect_failures",
        "connections",
        "drain_closed",
        "drain_deadline",
        "drain_handle",
        "ejected",
        "ends",
        "failure_streak",
        "healthy",
        "host",
        "key",
        "listener",
        "literal",
        "name",
        "port",
        "total",
        "weight",
    )

    def __init__(self, listener: str, config: BackendConfig) -> None:
        self.listener = listener
        self.name = config.name
        self.address = config.address
        self.host, self.port = split_host_port(config.address)
        self.literal = _is_ip(self.host)  # else a name, resolved at connect time
        self.key: BackendKey = (listener, config.name, config.address)
        self.weight = config.weight
        # Active checks set `healthy`; passive ejection sets `ejected` for a while.
        self.healthy = True
        self.ejected = False
        self.failure_streak = 0  # consecutive failed connects, for ejection
        # While draining, when the deadline falls on the loop's clock (loop.time(), monotonic,
        # not wall-clock); else None.
        self.drain_deadline: float | None = None
        self.drain_handle: asyncio.TimerHandle | None = None
        # Every connection picked for this backend and not closed yet, from the pick on:
        # connecting, established, half-closed or closing. Drain, idle, shutdown, /status and
        # the metrics all read this set, and a drained backend is forgotten when it is empty.
        self.connections: set[Connection] = set()
        self.total = 0  # connections that reached it (connected)
        self.bytes_up_closed = 0
        self.bytes_down_closed = 0
        self.drain_closed = 0
        self.connect_failures = dict.fromkeys(CONNECT_FAILURE_REASONS, 0)
        self.ends: dict[str, int] = {}  # closed connections by end reason

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    @property
    def state(self) -> str:
        if self.draining:
            return DRAINING
        if not self.up:
            return UNHEALTHY
        return ZERO if self.weight == 0 else ACTIVE

    @property
    def up(self) -> bool:
        return self.healthy and not self.ejected

    def eligible(self) -> bool:
        return self.drain_deadline is None and self.healthy and not self.ejected

    def eligible_if_panicking(self) -> bool:
        """Eligible when every backend is ejected: ejection is then ignored."""
        return self.drain_deadline is None and self.healthy

    def bytes_up(self) -> int:
        return self.bytes_up_closed + sum(c.bytes_up for c in self.connections)

    def bytes_down(self) -> int:
        return self.bytes_down_closed + sum(c.bytes_down for c in self.connections)

    def start_draining(self, deadline: float, handle: asyncio.TimerHandle) -> None:
        self.stop_draining()
        self.drain_deadline = deadline
        self.drain_handle = handle

    def stop_draining(self) -> None:
        if self.drain_handle is not None:
            self.drain_handle.cancel()
        self.drain_handle = None
        self.drain_deadline = None
