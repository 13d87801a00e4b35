"""A listener: accept -> pick a backend -> connect (with retries) -> relay; drains and idles."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from tcpproxy import health, proxy_protocol, relay
from tcpproxy.balancer import SmoothWeightedRoundRobin
from tcpproxy.config import HealthCheckConfig, ListenerConfig, RolloutConfig, split_host_port
from tcpproxy.backend import Backend
from tcpproxy.relay import Connection
from tcpproxy.resolver import Resolver
from tcpproxy.rollout import PAUSED, RUNNING, Rollout, Sample, split_weights
from tcpproxy.splice import SpliceConnection
from tcpproxy.table import BackendKey, ListenerPlan, backend_key

if TYPE_CHECKING:
    from tcpproxy.metrics import Metrics

log = logging.getLogger("tcpproxy")
access_log = logging.getLogger("tcpproxy.access")

MAX_CONNECT_ATTEMPTS = 3
LISTEN_BACKLOG = 4096
# At a drain deadline the remaining connections are closed over this window, in steps, so
# that their clients do not all reconnect in the same instant.
DRAIN_CLOSE_WINDOW_S = 1.0
DRAIN_CLOSE_STEPS = 10
IDLE_SWEEP_MAX_S = 10.0
ROLLOUT_TICK_MAX_S = 1.0
# New-connection counts per backend every few seconds, for the status page's share chart.
HISTORY_INTERVAL_S = 5.0
HISTORY_SAMPLES = 120
LOCAL_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_LOG_INTERVAL_S = 5.0  # at most one "out of file descriptors" line this often


class Server(Protocol):
    """What a listener needs of its listening socket (relay.Server, or a test's stand-in)."""

    def close(self) -> None: ...
    async def start_serving(self) -> None: ...


def classify_connect_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    return "other"


class Listener:
    """One configured listener and everything live under it."""

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
        self.backends: dict[BackendKey, Backend] = {}  # in the config now
        self.draining: dict[BackendKey, Backend] = {}  # removed, connections still open
        self.balancer: SmoothWeightedRoundRobin[Backend] = SmoothWeightedRoundRobin([])
        self.server: Server | None = None
        self.connecting: set[Connection] = set()
        self.open_connections = 0
        self.retired = False  # removed from the config; lives on while connections drain
        self.on_empty: asyncio.Event = asyncio.Event()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_interval: float | None = None
        self._checker: health.HealthChecker | None = None
        self._ordered: list[Backend] = []
        self.rollout: Rollout | None = None
        self._rollout_share = 0
        self._rollout_handle: asyncio.TimerHandle | None = None
        self._history: deque[tuple[float, dict[str, int]]] = deque(maxlen=HISTORY_SAMPLES)
        self._history_handle: asyncio.TimerHandle | None = None
        self.resolver = Resolver(self.loop.getaddrinfo, self.loop.time)
        self._last_exhausted_log = -RESOURCE_LOG_INTERVAL_S
        self._last_panic_log = -RESOURCE_LOG_INTERVAL_S
        self._rejected = {
            reason: metrics.rejected.labels(self.name, reason)
            for reason in ("no_backend", "max_connections", "connect_failed", "proxy_protocol")
        }
        self._on_retired_empty = on_retired_empty
        # Read once: the access log is on or off for the life of the process.
        self._log_access = access_log.isEnabledFor(logging.INFO)

    # -- lifecycle --

    async def bind(self, bind: str) -> Server:
        host, port = split_host_port(bind)
        engine = SpliceConnection if self.config.engine == "splice" else Connection
        return relay.Server(self, host, port, LISTEN_BACKLOG, engine)

    def serve(self, server: Server) -> None:
        """Accept on `server` from now on; a previous server (old bind) stops accepting."""
        if self.server is not None and self.server is not server:
            self.server.close()
        self.server = server
        self.retired = False

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def apply(self, plan: ListenerPlan) -> None:
        """Apply one listener's share of a reload plan, all in one step."""
        self.config = plan.config
        now = self.loop.time()
        by_key = {backend_key(self.name, b): b for b in plan.config.backends}
        if plan.kind == "removed":
            self.retired = True
            by_key = {}
        for key in [k for k in self.backends if k not in by_key]:
            backend = self.backends.pop(key)
            self._start_draining(backend, now)
        ordered: list[Backend] = []
        for key, cfg in by_key.items():
            current = self.backends.get(key)
            if current is None:
                current = self.draining.pop(key, None)
                if current is not None:
                    current.stop_draining()
                else:
                    current = Backend(self.name, cfg)
                self.backends[key] = current
            backend = current
            backend.weight = cfg.weight
            ordered.append(backend)
        self._ordered = ordered
        if self._history_handle is None:
            self._history_handle = self.loop.call_later(HISTORY_INTERVAL_S, self._sample_history)
        self._configure_rollout(None if self.retired else plan.config.rollout)
        self._rebuild_balancer()
        self._schedule_idle_sweep()
        self._configure_health_checks(None if self.retired else plan.config.health_check)

    # -- weights, and the rollout that may override two of them --

    def _sample_history(self) -> None:
        self._history.append((time.time(), {b.name: b.total for b in self._ordered}))
        self._history_handle = self.loop.call_later(HISTORY_INTERVAL_S, self._sample_history)

    def share_history(self) -> list[dict[str, object]]:
        """Share of new connections per backend in each interval of the last minutes."""
        out: list[dict[str, object]] = []
        samples = [*self._history, (time.time(), {b.name: b.total for b in self._ordered})]
        for (_, before), (at, after) in itertools.pairwise(samples):
            new = {name: after[name] - before.get(name, 0) for name in after}
            total = sum(new.values())
            shares = {name: n / total for name, n in new.items()} if total else {}
            out.append({"at": at, "connections": total, "share": shares})
        return out

    def effective_weight(self, backend: Backend) -> int:
        rollout = self.rollout
        if rollout is not None and backend.name in (rollout.config.from_, rollout.config.to):
            a, b = split_weights(self._rollout_share)
            return b if backend.name == rollout.config.to else a
        return backend.weight

    def _rebuild_balancer(self) -> None:
        self.balancer = SmoothWeightedRoundRobin(
            [(b, self.effective_weight(b)) for b in self._ordered]
        )

    def _configure_rollout(self, config: RolloutConfig | None) -> None:
        current = self.rollout.config if self.rollout is not None else None
        if config == current:
            return  # unchanged by this reload: the rollout keeps its state
        if self._rollout_handle is not None:
            self._rollout_handle.cancel()
            self._rollout_handle = None
        self.rollout = None
        if config is None:
            return
        self.rollout = Rollout(config, time.time())
        self._rollout_share = self.rollout.share(time.time())
        log.info(
            "%s: rollout %s -> %s started at step %d (%d%%)",
            self.name,
            config.from_,
            config.to,
            self.rollout.step(time.time()) + 1,
            self._rollout_share,
            extra={"listener": self.name, "rollout": "started"},
        )
        self._rollout_tick()

    def _rollout_tick(self) -> None:
        self._rollout_handle = None
        rollout = self.rollout
        if rollout is None:
            return
        now = time.time()
        target = next((b for b in self._ordered if b.name == rollout.config.to), None)
        if target is not None:
            failures = sum(target.connect_failures.values())
            sample = Sample(now, target.total + failures, failures)
            event = rollout.advance(now, sample, target.up)
            if event is not None:
                level = logging.WARNING if event.startswith("aborted") else logging.INFO
                log.log(
                    level,
                    "%s: rollout %s -> %s %s",
                    self.name,
                    rollout.config.from_,
                    rollout.config.to,
                    event,
                    extra={"listener": self.name, "rollout": rollout.state},
                )
        self._apply_rollout_share(now)
        if rollout.state in (RUNNING, PAUSED):
            # Tick at the next step boundary (plus a hair), or sooner to check for aborts.
            tick = ROLLOUT_TICK_MAX_S
            next_change = rollout.next_change(now)
            if next_change is not None:
                tick = min(tick, next_change + 0.001)
            self._rollout_handle = self.loop.call_later(tick, self._rollout_tick)

    def _apply_rollout_share(self, now: float) -> None:
        assert self.rollout is not None
        share = self.rollout.share(now)
        self.rollout.applied_step = self.rollout.step(now)
        self.rollout.applied_share = share
        if share != self._rollout_share:
            self._rollout_share = share
            self._rebuild_balancer()
            log.info(
                "%s: rollout step %d: %d%% of new connections to %s",
                self.name,
                self.rollout.step(now) + 1,
                share,
                self.rollout.config.to,
                extra={"listener": self.name, "rollout": self.rollout.state, "share": share},
            )

    def control_rollout(self, action: str) -> bool:
        """pause, resume or abort; False when the rollout is not in a state that allows it."""
        rollout = self.rollout
        if rollout is None:
            return False
        now = time.time()
        if action == "pause":
            done = rollout.pause(now)
        elif action == "resume":
            done = rollout.resume(now)
        elif action == "abort":
            done = rollout.abort("aborted by an operator")
        else:
            raise ValueError(action)
        if done:
            log.warning(
                "%s: rollout %s by an operator",
                self.name,
                {"pause": "paused", "resume": "resumed", "abort": "aborted"}[action],
                extra={"listener": self.name, "rollout": rollout.state},
            )
            self._apply_rollout_share(now)
        return done

    def _configure_health_checks(self, check: HealthCheckConfig | None) -> None:
        current = self._checker.check if self._checker is not None else None
        if check == current:
            return
        if self._checker is not None:
            self._checker.stop()
            self._checker = None
        if check is not None:
            self._checker = health.HealthChecker(self.name, check, self.backends.values)

    def _start_draining(self, backend: Backend, now: float) -> None:
        deadline = now + self.config.drain_timeout
        handle = self.loop.call_at(deadline, self._drain_deadline, backend)
        backend.start_draining(deadline, handle)
        self.draining[backend.key] = backend
        self._forget_if_drained(backend)

    def _drain_deadline(self, backend: Backend) -> None:
        backend.drain_handle = None
        conns = list(backend.connections)
        if not conns:
            return
        step = -(-len(conns) // DRAIN_CLOSE_STEPS)
        deadline = backend.drain_deadline
        for i in range(0, len(conns), step):
            delay = DRAIN_CLOSE_WINDOW_S * (i // step) / DRAIN_CLOSE_STEPS
            self.loop.call_later(delay, self._drain_close, backend, deadline, conns[i : i + step])

    def _drain_close(
        self, backend: Backend, deadline: float | None, conns: list[Connection]
    ) -> None:
        if backend.drain_deadline != deadline:
            return  # put back meanwhile (and maybe removed again: a new deadline)
        for conn in conns:
            if not conn.closed:
                backend.drain_closed += 1
                conn.shut(relay.DRAIN_DEADLINE)

    def _forget_if_drained(self, backend: Backend) -> None:
        if backend.draining and not backend.connections and backend.key in self.draining:
            if backend.drain_handle is not None:
                backend.drain_handle.cancel()
                backend.drain_handle = None
            del self.draining[backend.key]
            self.metrics.forget_backend(backend)
            if self.retired and not self.draining:
                self._on_retired_empty(self)

    def all_backends(self) -> Iterator[Backend]:
        yield from self.backends.values()
        yield from self.draining.values()

    def live_connections(self) -> Iterator[Connection]:
        yield from self.connecting
        for backend in self.all_backends():
            yield from backend.connections

    def close_all(self, reason: str) -> None:
        for conn in list(self.live_connections()):
            conn.shut(reason)

    # -- idle timeout: one sweep per listener rather than a timer per connection --

    def _schedule_idle_sweep(self) -> None:
        idle = self.config.idle_timeout
        interval = min(max(idle / 4, 0.05), IDLE_SWEEP_MAX_S) if idle > 0 else None
        if self._idle_handle is not None:
            if interval == self._idle_interval:
                return  # a reload that keeps the timeout must not restart (starve) the sweep
            self._idle_handle.cancel()
            self._idle_handle = None
        self._idle_interval = interval
        if interval is not None:
            self._idle_handle = self.loop.call_later(interval, self._sweep_idle, interval)

    def _sweep_idle(self, interval: float) -> None:
        now = self.loop.time()
        idle = self.config.idle_timeout
        expired = []
        for conn in self.live_connections():
            mark = conn.activity_mark()
            if mark != conn.idle_mark:
                conn.idle_mark = mark
                conn.idle_since = now
            elif now - conn.idle_since >= idle:
                expired.append(conn)
        for conn in expired:
            conn.shut(relay.IDLE_TIMEOUT)
        self._idle_handle = self.loop.call_later(interval, self._sweep_idle, interval)

    def cancel_timers(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
            self._idle_interval = None
        if self._rollout_handle is not None:
            self._rollout_handle.cancel()
            self._rollout_handle = None
        if self._history_handle is not None:
            self._history_handle.cancel()
            self._history_handle = None
        self._configure_health_checks(None)

    # -- connections (relay.Owner) --

    def pick(self, exclude: Sequence[Backend] = ()) -> Backend | None:
        backend = self.balancer.pick(Backend.eligible, exclude)
        if backend is None:
            # Passive ejection alone never empties a listener: when every candidate is
            # ejected (all refused for a moment, as in a rolling restart), trying them beats
            # refusing every client until the ejections expire.
            backend = self.balancer.pick(Backend.eligible_if_panicking, exclude)
            if backend is not None:
                self._log_panic()
        return backend

    def _log_panic(self) -> None:
        now = self.loop.time()
        if now - self._last_panic_log >= RESOURCE_LOG_INTERVAL_S:
            self._last_panic_log = now
            log.warning(
                "%s: every backend with weight is ejected: sending new connections to them anyway",
                self.name,
                extra={"listener": self.name, "reason": "panic"},
            )

    def connection_opened(self, conn: Connection) -> None:
        conn.opened_at = self.loop.time()
        self.open_connections += 1
        if self._log_access:
            conn.peer = conn.peername
        if self.open_connections > self.config.max_connections:
            self._reject(conn, "max_connections")
            return
        pp = self.config.proxy_protocol
        if pp is not None and pp.accept:
            # Nothing is connected until the client's PROXY header is in, within the connect
            # timeout: a client that never sends one cannot hold a backend connection.
            conn.await_header()
            self.connecting.add(conn)
            conn.timer = self.loop.call_later(
                self.config.connect_timeout, self._header_timed_out, conn
            )
            return
        if pp is not None and pp.send and conn.peer is None:
            conn.peer = conn.peername
        self._start_connect(conn)

    def _start_connect(self, conn: Connection) -> None:
        backend = self.pick()
        if backend is None:
            self._reject(conn, "no_backend")
            return
        self.connecting.add(conn)
        self._attempt(conn, backend)

    def header_received(self, conn: Connection) -> None:
        data = b"".join(conn.pending or ())
        try:
            header = proxy_protocol.parse(data)
        except proxy_protocol.ProxyProtocolError as exc:
            log.info("%s: closing a client: %s", self.name, exc, extra={"listener": self.name})
            self._reject(conn, "proxy_protocol")
            return
        if header is None:
            return
        conn.header_done()
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self.connecting.discard(conn)
        rest = data[header.length :]
        conn.pending = [rest] if rest else None
        conn.pending_bytes = len(rest)
        conn.peer = header.source or conn.peername
        conn.local = header.destination
        self._start_connect(conn)

    def _header_timed_out(self, conn: Connection) -> None:
        conn.timer = None
        self._reject(conn, "proxy_protocol")

    def _reject(self, conn: Connection, reason: str) -> None:
        self._rejected[reason].inc()
        conn.shut("rejected_" + reason)

    # Connecting is callbacks, not a coroutine: a Task per connection costs more CPU than
    # the rest of the accept path (benchmarks/README.md).

    def _attempt(self, conn: Connection, backend: Backend) -> None:
        conn.target = backend
        conn.timer = self.loop.call_later(
            self.config.connect_timeout, self._connect_timed_out, conn
        )
        if not backend.literal:
            conn.connect_task = self.loop.create_task(self._resolve_and_connect(conn, backend))
            return
        try:
            conn.connect(backend.host, backend.port)
        except OSError as exc:
            self.connect_failed(conn, exc)

    async def _resolve_and_connect(self, conn: Connection, backend: Backend) -> None:
        try:
            host = await self.resolver.next_address(backend.host, backend.port)
            conn.connect_task = None
            conn.connect(host, backend.port)
        except OSError as exc:
            conn.connect_task = None
            self.connect_failed(conn, exc)

    def _connect_timed_out(self, conn: Connection) -> None:
        conn.timer = None
        if conn.connect_task is not None:
            conn.connect_task.cancel()
            conn.connect_task = None
        conn.abort_connect()
        self.connect_failed(conn, TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def connect_failed(self, conn: Connection, exc: OSError) -> None:
        """An attempt failed: try the next backend (never one that failed), up to
        MAX_CONNECT_ATTEMPTS in all."""
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        target = conn.target
        assert target is not None
        if exc.errno in LOCAL_RESOURCE_ERRNOS:
            # Out of file descriptors or memory here: not the backend's fault, so no
            # failure is held against it, and another backend would fail the same way.
            self._resource_exhausted(exc, "open a backend connection")
            candidate = None
        else:
            self._connect_failed(target, classify_connect_error(exc))
            conn.tried += (target,)
            candidate = self.pick(conn.tried)
        if candidate is None or len(conn.tried) >= MAX_CONNECT_ATTEMPTS:
            self._rejected["connect_failed"].inc()
            conn.shut(relay.CONNECT_FAILED)
            return
        self._attempt(conn, candidate)

    def _resource_exhausted(self, exc: OSError, doing: str) -> None:
        now = self.loop.time()
        if now - self._last_exhausted_log >= RESOURCE_LOG_INTERVAL_S:
            self._last_exhausted_log = now
            log.error(
                "%s: cannot %s: %s (raise the open files limit, or lower max_connections)",
                self.name,
                doing,
                os.strerror(exc.errno or 0),
                extra={"listener": self.name, "reason": "resources"},
            )

    def accept_failed(self, exc: OSError) -> None:
        self._resource_exhausted(exc, "accept new clients (closing them)")

    def _connect_failed(self, target: Backend, reason: str) -> None:
        target.connect_failures[reason] += 1
        health.connect_failed(self.name, target, self.config.ejection, self.loop)
        log.warning(
            "connect to %s/%s (%s) failed: %s",
            self.name,
            target.name,
            target.address,
            reason,
            extra={"listener": self.name, "backend": target.name, "reason": reason},
        )

    def connection_established(self, conn: Connection) -> None:
        backend = conn.backend
        assert backend is not None
        self.connecting.discard(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        backend.connections.add(conn)
        backend.total += 1
        backend.failure_streak = 0
        pp = self.config.proxy_protocol
        if pp is not None and pp.send:
            # Before any client byte (the client's early bytes are written after this).
            peer = conn.peer
            local = conn.local or conn.sockname()
            if isinstance(peer, tuple) and isinstance(local, tuple):
                conn.write_first(proxy_protocol.build(pp.send, peer[:2], local[:2]))

    def connection_closed(self, conn: Connection) -> None:
        self.open_connections -= 1
        self.connecting.discard(conn)
        backend = conn.backend
        if backend is not None:
            backend.connections.discard(conn)
            backend.bytes_up_closed += conn.bytes_up
            backend.bytes_down_closed += conn.bytes_down
            reason = conn.reason or "unknown"
            backend.ends[reason] = backend.ends.get(reason, 0) + 1
            self.metrics.observe_duration(backend, self.loop.time() - conn.opened_at)
            if backend.draining:
                self._forget_if_drained(backend)
        if self.open_connections == 0:
            self.on_empty.set()
        if self._log_access:
            self._write_access_log(conn)

    def _write_access_log(self, conn: Connection) -> None:
        backend = conn.backend
        peer = conn.peer
        if isinstance(peer, tuple):
            host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
            client = f"{host}:{peer[1]}"
        else:
            client = str(peer)
        access_log.info(
            "%s %s -> %s up=%d down=%d %.3fs %s",
            self.name,
            client,
            backend.name if backend else "-",
            conn.bytes_up,
            conn.bytes_down,
            self.loop.time() - conn.opened_at,
            conn.reason,
            extra={
                "listener": self.name,
                "backend": backend.name if backend else None,
                "client": client,
                "bytes_up": conn.bytes_up,
                "bytes_down": conn.bytes_down,
                "duration_s": round(self.loop.time() - conn.opened_at, 6),
                "end": conn.reason,
            },
        )
