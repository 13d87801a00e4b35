"""A listener: accept -> admit -> pick a backend and connect -> relay, as the relay's Owner.

The parts live in their own modules: admission.py (max_connections, the PROXY header wait),
connector.py (pick, connect, retry), pool.py (the backends and what they hold), reaper.py
(idle sweep, drain deadlines) and accesslog.py. This module ties them to one configured
listener and its listening socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from tcpproxy import acceptor
from tcpproxy.accesslog import AccessLog
from tcpproxy.admission import Admission, Rejections
from tcpproxy.backend import Backend
from tcpproxy.config import ListenerConfig, split_host_port
from tcpproxy.connector import Connector
from tcpproxy.pool import BackendPool
from tcpproxy.reaper import Reaper
from tcpproxy.relay import Connection
from tcpproxy.rollout import Rollout
from tcpproxy.splice import SpliceConnection
from tcpproxy.table import BackendKey, ListenerPlan

if TYPE_CHECKING:
    from tcpproxy.metrics import Metrics

log = logging.getLogger("tcpproxy")

# At max_connections new clients wait in the listening socket's queue (the kernel completes
# their handshakes; Linux caps this at net.core.somaxconn); past it, their SYNs are dropped
# and they retry.
LISTEN_BACKLOG = 4096
# At most one "max_connections reached" line this often.
FULL_LOG_INTERVAL_S = 60.0


class Server(Protocol):
    """What a listener needs of its listening socket (acceptor.Server, or a test's stand-in)."""

    def close(self) -> None: ...
    async def start_serving(self) -> None: ...
    def set_accepting(self, accepting: bool) -> None: ...


class Listener:
    """One configured listener and everything live under it. Its connections are the ones
    waiting for a PROXY header and those its backends hold: idle sweep, shutdown and /status
    see exactly those. Once removed from the config it lives on until it holds none."""

    def __init__(
        self,
        config: ListenerConfig,
        metrics: Metrics,
        on_retired_empty: Callable[[Listener], None],
    ) -> None:
        self.config = config
        self.name = config.name
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.server: Server | None = None
        self.open_connections = 0
        # At max_connections: not accepting (clients wait in the kernel's listen queue).
        self.full = False
        self._last_full_log = -FULL_LOG_INTERVAL_S
        self.retired = False  # removed from the config; lives on while connections drain
        self.on_empty: asyncio.Event = asyncio.Event()
        self._on_retired_empty = on_retired_empty
        self.pool = BackendPool(self.name, self.loop, metrics, self._forget_if_drained)
        rejections = Rejections(self.name, metrics)
        self.admission = Admission(self.name, self.loop, config, rejections)
        self.connector = Connector(self.name, self.loop, config, self.pool, rejections)
        self.reaper = Reaper(self.loop, self.live_connections)
        self.access_log = AccessLog(self.name, self.loop) if AccessLog.enabled() else None

    # -- lifecycle --

    async def bind(self, config: ListenerConfig) -> Server:
        """A listening socket for `config`: the listener's config in the reload being applied
        (binding comes before the rest of it is applied), whose engine may have changed."""
        host, port = split_host_port(config.bind)
        engine = SpliceConnection if config.engine == "splice" else Connection
        return acceptor.Server(self, host, port, LISTEN_BACKLOG, engine)

    def serve(self, server: Server) -> None:
        """Accept on `server` from now on; a previous server (old bind) stops accepting."""
        if self.server is not None and self.server is not server:
            self.server.close()
        self.server = server
        self.retired = False
        server.set_accepting(not self.full)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def apply(self, plan: ListenerPlan) -> None:
        """Apply one listener's share of a reload plan, all in one step."""
        config = self.config = self.admission.config = self.connector.config = plan.config
        if plan.kind == "removed":
            self.retired = True
        now = self.loop.time()
        removed = self.pool.apply(config, self.retired)
        for backend in removed:
            self.reaper.start_draining(backend, now, config.drain_timeout)
        self.reaper.set_timeouts(config)
        self._check_full()
        for backend in removed:
            self.pool.forget_if_drained(backend)  # at once if it holds no connection
        self._forget_if_drained()

    @property
    def drained(self) -> bool:
        """Nothing left under it: no backend, configured or draining, and no client waiting
        for its PROXY header."""
        return not (self.pool.backends or self.pool.draining or self.admission.waiting)

    def _forget_if_drained(self) -> None:
        if self.retired and self.drained:
            self._on_retired_empty(self)

    def cancel_timers(self) -> None:
        self.reaper.cancel()
        self.pool.cancel_timers()

    # -- views (the admin API's, the metrics', the reload diff's) --

    @property
    def backends(self) -> dict[BackendKey, Backend]:
        return self.pool.backends

    @property
    def draining(self) -> dict[BackendKey, Backend]:
        return self.pool.draining

    @property
    def rollout(self) -> Rollout | None:
        return self.pool.rollout

    def effective_weight(self, backend: Backend) -> int:
        return self.pool.effective_weight(backend)

    def share_history(self) -> list[dict[str, object]]:
        return self.pool.share_history()

    def control_rollout(self, action: str, by: str, client: str | None = None) -> bool:
        return self.pool.control_rollout(action, by, client)

    def all_backends(self) -> Iterator[Backend]:
        return self.pool.all_backends()

    def live_connections(self) -> Iterator[Connection]:
        yield from self.admission.waiting
        for backend in self.pool.all_backends():
            yield from backend.connections

    def close_all(self, reason: str) -> None:
        for conn in list(self.live_connections()):
            conn.shut(reason)

    # -- connections (relay.Owner) --

    def _check_full(self) -> None:
        """Stop taking clients off the listen queue at max_connections, and start again
        below it: clients wait in the kernel rather than being accepted and closed."""
        full = self.open_connections >= self.config.max_connections
        if full == self.full:
            return
        self.full = full
        if self.server is not None:
            self.server.set_accepting(not full)
        now = self.loop.time()
        if full and now - self._last_full_log >= FULL_LOG_INTERVAL_S:
            self._last_full_log = now
            log.warning(
                "%s: max_connections %d reached: new clients wait in the listen queue until "
                "a connection closes",
                self.name,
                self.config.max_connections,
                extra={"listener": self.name, "reason": "max_connections"},
            )

    def connection_opened(self, conn: Connection) -> None:
        conn.opened_at = self.loop.time()
        self.open_connections += 1
        if self.open_connections >= self.config.max_connections:
            self._check_full()
        if self.access_log is not None:
            conn.peer = conn.peername
        if self.admission.admit(conn, self.open_connections):
            self.connector.start(conn)

    def header_received(self, conn: Connection) -> None:
        if self.admission.header_received(conn):
            self.connector.start(conn)

    def connect_failed(self, conn: Connection, exc: OSError) -> None:
        self.connector.failed(conn, exc)

    def connection_established(self, conn: Connection) -> None:
        self.connector.established(conn)

    def accept_failed(self, exc: OSError) -> None:
        self.connector.resource_exhausted(exc, "accept new clients (closing them)")

    def connection_closed(self, conn: Connection) -> None:
        self.open_connections -= 1
        if self.full:
            self._check_full()
        self.admission.discard(conn)
        self.pool.release(conn)
        if self.retired:
            self._forget_if_drained()
        if self.open_connections == 0:
            self.on_empty.set()
        if self.access_log is not None:
            self.access_log.write(conn)
