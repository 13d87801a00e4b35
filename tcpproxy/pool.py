"""A listener's backends: those in the config and those draining, the connections each one
holds, the balancer over them, their health checks, the rollout that may override two of
their weights, and the share history of new connections."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from tcpproxy import health
from tcpproxy.affinity import ClientHash
from tcpproxy.backend import Backend
from tcpproxy.balancer import SmoothWeightedRoundRobin
from tcpproxy.config import HealthCheckConfig, ListenerConfig, RolloutConfig
from tcpproxy.fleet import FleetJudge
from tcpproxy.rollout import PAUSED, RUNNING, Rollout, Sample, pair_weights
from tcpproxy.table import BackendKey, backend_key

if TYPE_CHECKING:
    from tcpproxy.metrics import Metrics
    from tcpproxy.relay import Connection

log = logging.getLogger("tcpproxy")

ROLLOUT_TICK_MAX_S = 1.0
# New-connection counts per backend every few seconds, for the status page's share chart.
HISTORY_INTERVAL_S = 5.0
HISTORY_SAMPLES = 120


class BackendPool:
    """The live backends of one listener. A connection belongs to a backend from the moment
    it is picked for it (`assign`) until it closes (`release`); a draining backend is
    forgotten only once it holds none."""

    def __init__(
        self,
        listener: str,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        on_forgotten: Callable[[], None],
    ) -> None:
        self.listener = listener
        self.loop = loop
        self.metrics = metrics
        self.backends: dict[BackendKey, Backend] = {}  # in the config now
        self.draining: dict[BackendKey, Backend] = {}  # removed, connections still open
        self.balancer: SmoothWeightedRoundRobin[Backend] = SmoothWeightedRoundRobin([])
        # With `balance: client_hash`: picks by client address (the balancer serves clients
        # whose address is unknown).
        self.affinity: ClientHash[Backend] | None = None
        self._balance = "round_robin"
        self._ordered: list[Backend] = []
        self._checker: health.HealthChecker | None = None
        self.rollout: Rollout | None = None
        self._rollout_share = 0
        self._rollout_handle: asyncio.TimerHandle | None = None
        self._judge: FleetJudge | None = None
        self._effective: dict[str, int] = {}
        self._history: deque[tuple[float, dict[str, int]]] = deque(maxlen=HISTORY_SAMPLES)
        self._history_handle: asyncio.TimerHandle | None = None
        self._on_forgotten = on_forgotten  # a draining backend was forgotten

    def apply(self, config: ListenerConfig, retired: bool) -> list[Backend]:
        """Take the backends of `config` (none once the listener is `retired`). Returns the
        ones it removed, now in `draining`, for the caller to give a drain deadline."""
        backends = () if retired else config.backends
        by_key = {backend_key(self.listener, b): b for b in backends}
        removed = [self.backends.pop(key) for key in list(self.backends) if key not in by_key]
        for backend in removed:
            self.draining[backend.key] = backend
        ordered: list[Backend] = []
        for key, cfg in by_key.items():
            current = self.backends.get(key)
            if current is None:
                current = self.draining.pop(key, None)
                if current is not None:
                    current.stop_draining()
                else:
                    current = Backend(self.listener, cfg)
                self.backends[key] = current
            backend = current
            backend.weight = cfg.weight
            ordered.append(backend)
        self._ordered = ordered
        # In file order, a re-added backend in its place rather than last (/status, the page).
        self.backends = {backend.key: backend for backend in ordered}
        if self._history_handle is None:
            self._history_handle = self.loop.call_later(HISTORY_INTERVAL_S, self._sample_history)
        self._configure_rollout(None if retired else config.rollout)
        self._balance = config.balance
        self._rebuild_balancer()
        self._configure_health_checks(None if retired else config.health_check)
        return removed

    def all_backends(self) -> Iterator[Backend]:
        yield from self.backends.values()
        yield from self.draining.values()

    def cancel_timers(self) -> None:
        if self._rollout_handle is not None:
            self._rollout_handle.cancel()
            self._rollout_handle = None
        self._stop_judge()
        if self._history_handle is not None:
            self._history_handle.cancel()
            self._history_handle = None
        self._configure_health_checks(None)

    # -- the connections each backend holds --

    def assign(self, conn: Connection, backend: Backend) -> None:
        """`conn` belongs to `backend` from now on: its first pick, or a retry's."""
        previous = conn.target
        conn.target = backend
        backend.connections.add(conn)
        if previous is not None and previous is not backend:
            previous.connections.discard(conn)
            self.forget_if_drained(previous)

    def release(self, conn: Connection) -> None:
        """`conn` closed: it leaves its backend, whose totals keep what it did if it had
        connected."""
        backend = conn.target
        if backend is None:
            return
        backend.connections.discard(conn)
        if conn.backend is not None:
            backend.bytes_up_closed += conn.bytes_up
            backend.bytes_down_closed += conn.bytes_down
            reason = conn.reason or "unknown"
            backend.ends[reason] = backend.ends.get(reason, 0) + 1
            self.metrics.observe_duration(backend, self.loop.time() - conn.opened_at)
        self.forget_if_drained(backend)

    def forget_if_drained(self, backend: Backend) -> None:
        if (
            backend.draining
            and not backend.connections
            and self.draining.get(backend.key) is backend
        ):
            if backend.drain_handle is not None:
                backend.drain_handle.cancel()
                backend.drain_handle = None
            del self.draining[backend.key]
            self.metrics.forget_backend(backend)
            self._on_forgotten()

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
        """The weight new connections follow: the configured one, or under a rollout the
        pair's split (see pair_weights; reduced, so compare shares, not numbers)."""
        return self._effective.get(backend.name, backend.weight)

    def rollout_split(self) -> tuple[str, str, int] | None:
        """(from, to, to's share in percent) while a rollout overrides the pair's weights."""
        rollout = self.rollout
        if rollout is None:
            return None
        return rollout.config.from_, rollout.config.to, self._rollout_share

    def _rebuild_balancer(self) -> None:
        weights = {b.name: b.weight for b in self._ordered}
        rollout = self.rollout
        if rollout is not None and {rollout.config.from_, rollout.config.to} <= weights.keys():
            rollout.pair_weight = weights[rollout.config.from_] + weights[rollout.config.to]
            rollout.pair_part = rollout.pair_weight / (sum(weights.values()) or 1)
            weights = pair_weights(
                weights, rollout.config.from_, rollout.config.to, self._rollout_share
            )
        self._effective = weights
        self.balancer = SmoothWeightedRoundRobin([(b, weights[b.name]) for b in self._ordered])
        self.affinity = None
        if self._balance == "client_hash":
            # Configured weights: the rollout's pair is one group of their sum, split inside.
            self.affinity = ClientHash(
                [(b, b.name, b.weight) for b in self._ordered], self.rollout_split()
            )

    def _log_rollout(self, level: int, event: str, **fields: object) -> None:
        rollout = self.rollout
        assert rollout is not None
        log.log(
            level,
            "%s: rollout %s -> %s %s",
            self.listener,
            rollout.config.from_,
            rollout.config.to,
            event,
            extra={"listener": self.listener, "rollout": rollout.state, **fields},
        )

    def _configure_rollout(self, config: RolloutConfig | None) -> None:
        now = time.time()
        current = self.rollout
        identity = config.identity(self.listener) if config is not None else None
        if current is not None and current.identity == identity:
            assert config is not None
            if config != current.config:
                self._update_rollout(current, config, now)
            return  # the same rollout: it keeps its state and its clock
        if self._rollout_handle is not None:
            self._rollout_handle.cancel()
            self._rollout_handle = None
        self._stop_judge()
        self.rollout = None
        if config is None or identity is None:
            return
        rollout = self.rollout = Rollout(config, identity, now)
        self._rollout_share = rollout.share(now)
        steps = len(config.steps)
        where = (
            f"at step {min(rollout.step(now), steps - 1) + 1} of {steps}"
            if rollout.state in (RUNNING, PAUSED)
            else f"as {rollout.state}"
        )
        self._log_rollout(
            logging.INFO,
            f"started {where} ({rollout.state}, {self._rollout_share}% of the pair's new "
            f"connections to {config.to})"
            + ("; asking Prometheus before any goes to it" if rollout.awaiting_fleet else ""),
            rollout_id=identity,
        )
        self._start_judge()
        self._rollout_tick()

    def _update_rollout(self, rollout: Rollout, config: RolloutConfig, now: float) -> None:
        """A reload changed the operator's decisions or the thresholds of the running
        rollout: apply them, log what changed, keep everything else."""
        before = rollout.state
        judge_before = rollout.config.abort.prometheus
        rollout.update(config)
        after = rollout.state
        if after != before:
            what = "resumed" if after == RUNNING else after
            self._log_rollout(
                logging.WARNING if after == "aborted" else logging.INFO,
                f"{what} by the config file"
                + (f": {rollout.reason}" if after == "aborted" else ""),
            )
        if config.abort.prometheus != judge_before:
            self._stop_judge()
        if self._judge is None:
            self._start_judge()
        if self._rollout_handle is not None:
            self._rollout_handle.cancel()
        self._rollout_tick()

    def _start_judge(self) -> None:
        rollout = self.rollout
        if rollout is None or rollout.config.abort.prometheus is None:
            if rollout is not None:
                rollout.awaiting_fleet = False
            return
        if rollout.state not in (RUNNING, PAUSED):
            rollout.awaiting_fleet = False
            return
        self._judge = FleetJudge(
            self.listener,
            rollout.identity,
            rollout.config,
            up=self.metrics.rollout_prometheus_up,
            errors=self.metrics.rollout_prometheus_errors,
            on_abort=self._fleet_abort,
            on_answer=self._fleet_answered,
        )
        self._judge.start()

    def _stop_judge(self) -> None:
        if self._judge is not None:
            self._judge.stop()
            self._judge = None

    def _fleet_abort(self, reason: str) -> None:
        rollout = self.rollout
        if rollout is not None and rollout.abort(f"{reason} (Prometheus)"):
            self._log_rollout(logging.WARNING, f"aborted: {rollout.reason}")
            self._apply_rollout_share(time.time())

    def _fleet_answered(self, ok: bool) -> None:
        rollout = self.rollout
        if rollout is None:
            return
        if rollout.awaiting_fleet:
            rollout.awaiting_fleet = False  # an answer, or an outage: judge as it says
            self._apply_rollout_share(time.time())
        if rollout.state not in (RUNNING, PAUSED):
            self._stop_judge()

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
            # While the fleet's judge answers, this replica's own few connects do not
            # decide alone: the fleet's numbers do.
            judge_here = self._judge is None or not self._judge.answering
            event = rollout.advance(now, sample, target.up, judge_here)
            if event is not None:
                level = logging.WARNING if event.startswith("aborted") else logging.INFO
                self._log_rollout(level, event)
        self._apply_rollout_share(now)
        if rollout.state in (RUNNING, PAUSED):
            # Tick at the next step boundary (plus a hair), or sooner to check for aborts.
            tick = ROLLOUT_TICK_MAX_S
            next_change = rollout.next_change(now)
            if next_change is not None:
                tick = min(tick, next_change + 0.001)
            self._rollout_handle = self.loop.call_later(tick, self._rollout_tick)
        else:
            self._stop_judge()

    def _apply_rollout_share(self, now: float) -> None:
        rollout = self.rollout
        assert rollout is not None
        rollout.observe(now)
        share = rollout.share(now)
        rollout.applied_step = rollout.step(now)
        rollout.applied_share = share
        if share != self._rollout_share:
            self._rollout_share = share
            self._rebuild_balancer()
            steps = rollout.config.steps
            where = (
                f"step {min(rollout.applied_step, len(steps) - 1) + 1} of {len(steps)}"
                if rollout.state in (RUNNING, PAUSED)
                else rollout.state
            )
            log.info(
                "%s: rollout %s: %d%% of the pair's new connections to %s",
                self.listener,
                where,
                share,
                rollout.config.to,
                extra={"listener": self.listener, "rollout": rollout.state, "share": share},
            )

    def control_rollout(self, action: str, by: str, client: str | None = None) -> bool:
        """pause, resume or abort on this replica only, asked for `by` someone (for the log
        and the abort reason; `client`: their address, logged as a field); False when the
        rollout is not in a state that allows it."""
        rollout = self.rollout
        if rollout is None:
            return False
        now = time.time()
        if action == "pause":
            done = rollout.pause(now)
        elif action == "resume":
            done = rollout.resume(now)
        elif action == "abort":
            done = rollout.abort(f"aborted by {by}")
        else:
            raise ValueError(action)
        if done:
            log.warning(
                "%s: rollout %s on this replica by %s",
                self.listener,
                {"pause": "paused", "resume": "resumed", "abort": "aborted"}[action],
                by,
                extra={"listener": self.listener, "rollout": rollout.state, "client": client},
            )
            self._apply_rollout_share(now)
            if rollout.state not in (RUNNING, PAUSED):
                self._stop_judge()
        return done

    def _configure_health_checks(self, check: HealthCheckConfig | None) -> None:
        current = self._checker.check if self._checker is not None else None
        if check == current:
            return
        if self._checker is not None:
            self._checker.stop()
            self._checker = None
        if check is not None:
            self._checker = health.HealthChecker(self.listener, check, self.backends.values)
