"""Every metric of DESIGN §6, defined once.

Per-backend figures (connections, bytes, weight, state, failures) are read from the live
Backend objects at scrape time by a custom collector: the data path only adds to plain ints,
and a backend that has drained away simply stops being reported, so its series disappear.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tcpproxy import __version__
from tcpproxy.backend import CONNECT_FAILURE_REASONS, Backend
from tcpproxy.rollout import STATES as ROLLOUT_STATES
from tcpproxy.rollout import Rollout

PREFIX = "tcpproxy_"
# How long a drained-away backend's series stay after its last connection closed, so that
# scrapes see the final counts (drain closes above all) before the series disappear.
DEFAULT_LINGER_S = 180.0
# `_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
DURATION_BUCKETS_S = (0.01, 0.1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


Labels = tuple[str, str]  # (listener, backend)


class _Carried:
    """Counters of drained-away Backends whose (listener, name) is still in use by another
    Backend (an address change). Added to that series so that its counters never go down."""

    __slots__ = ("bytes_down", "bytes_up", "connect_failures", "drain_closed", "ends", "total")

    def __init__(self) -> None:
        self.total = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.drain_closed = 0
        self.connect_failures = dict.fromkeys(CONNECT_FAILURE_REASONS, 0)
        self.ends: dict[str, int] = {}

    def add(self, backend: Backend) -> None:
        self.total += backend.total
        self.bytes_up += backend.bytes_up()
        self.bytes_down += backend.bytes_down()
        self.drain_closed += backend.drain_closed
        for reason, n in backend.connect_failures.items():
            self.connect_failures[reason] += n
        for reason, n in backend.ends.items():
            self.ends[reason] = self.ends.get(reason, 0) + n


_NOTHING_CARRIED = _Carried()


class _BackendCollector(Collector):
    def __init__(
        self, backends: Callable[[], Iterable[Backend]], carried: dict[Labels, _Carried]
    ) -> None:
        self._backends = backends
        self._carried = carried

    def collect(self) -> Iterator[Metric]:
        lb = ["listener", "backend"]
        total = CounterMetricFamily(
            PREFIX + "connections", "Connections routed to a backend.", labels=lb
        )
        active = GaugeMetricFamily(
            PREFIX + "connections_active", "Connections open now.", labels=lb
        )
        traffic = CounterMetricFamily(
            PREFIX + "bytes",
            "Bytes relayed; upstream = client->backend, downstream = backend->client.",
            labels=[*lb, "direction"],
        )
        failures = CounterMetricFamily(
            PREFIX + "backend_connect_failures",
            "Failed connection attempts to a backend.",
            labels=[*lb, "reason"],
        )
        closed = CounterMetricFamily(
            PREFIX + "connections_closed",
            "Closed connections by why they ended (the access log's `end`).",
            labels=[*lb, "reason"],
        )
        drained = CounterMetricFamily(
            PREFIX + "drain_closed_connections",
            "Connections closed by a drain deadline.",
            labels=lb,
        )
        weight = GaugeMetricFamily(PREFIX + "backend_weight", "Configured weight.", labels=lb)
        draining = GaugeMetricFamily(
            PREFIX + "backend_draining", "1 while the backend is draining.", labels=lb
        )
        up = GaugeMetricFamily(PREFIX + "backend_up", "1 healthy, 0 ejected.", labels=lb)
        # Changing a backend's address makes a second Backend with the same labels while the
        # old one drains: report them as one series, never as duplicate samples.
        groups: dict[Labels, list[Backend]] = {}
        for b in self._backends():
            groups.setdefault((b.listener, b.name), []).append(b)
        for (listener, name), same in groups.items():
            labels = [listener, name]
            configured = [b for b in same if not b.draining]
            old = self._carried.get((listener, name), _NOTHING_CARRIED)
            total.add_metric(labels, old.total + sum(b.total for b in same))
            active.add_metric(labels, sum(len(b.connections) for b in same))
            traffic.add_metric(
                [*labels, "upstream"], old.bytes_up + sum(b.bytes_up() for b in same)
            )
            traffic.add_metric(
                [*labels, "downstream"], old.bytes_down + sum(b.bytes_down() for b in same)
            )
            for reason in CONNECT_FAILURE_REASONS:
                failures.add_metric(
                    [*labels, reason],
                    old.connect_failures[reason] + sum(b.connect_failures[reason] for b in same),
                )
            drained.add_metric(labels, old.drain_closed + sum(b.drain_closed for b in same))
            ends = dict(old.ends)
            for b in same:
                for reason, n in b.ends.items():
                    ends[reason] = ends.get(reason, 0) + n
            for reason, n in sorted(ends.items()):
                closed.add_metric([*labels, reason], n)
            weight.add_metric(labels, configured[0].weight if configured else 0)
            draining.add_metric(labels, 0 if configured else 1)
            up.add_metric(labels, 1 if all(b.up for b in same) else 0)
        yield from (total, active, traffic, failures, closed, drained, weight, draining, up)


class _RolloutCollector(Collector):
    def __init__(self, rollouts: Callable[[], Iterable[tuple[str, Rollout]]]) -> None:
        self._rollouts = rollouts

    def collect(self) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            PREFIX + "rollout_step", "Current rollout step, from 1.", labels=["listener"]
        )
        share = GaugeMetricFamily(
            PREFIX + "rollout_share_percent",
            "The new backend's share of new connections under the rollout.",
            labels=["listener", "backend"],
        )
        state = GaugeMetricFamily(
            PREFIX + "rollout_state",
            "1 for the rollout's current state.",
            labels=["listener", "state"],
        )
        for listener, rollout in self._rollouts():
            step.add_metric(
                [listener], min(rollout.applied_step, len(rollout.config.steps) - 1) + 1
            )
            share.add_metric([listener, rollout.config.to], rollout.applied_share)
            for name in ROLLOUT_STATES:
                state.add_metric([listener, name], 1 if rollout.state == name else 0)
        yield from (step, share, state)


class Metrics:
    """One registry per proxy, so that several proxies can live in one process (tests)."""

    def __init__(
        self,
        backends: Callable[[], Iterable[Backend]],
        linger_s: float = DEFAULT_LINGER_S,
        rollouts: Callable[[], Iterable[tuple[str, Rollout]]] = tuple,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._carried: dict[Labels, _Carried] = {}
        self.registry.register(_BackendCollector(self._reported, self._carried))
        self.registry.register(_RolloutCollector(rollouts))
        self.linger_s = linger_s
        # Drained-away backends, reported until their deadline (monotonic seconds).
        self._lingering: list[tuple[float, Backend]] = []
        self.rejected = Counter(
            PREFIX + "connections_rejected",
            "Connections accepted and closed without a backend.",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            PREFIX + "connection_duration_seconds",
            "Lifetime of proxied connections.",
            ["listener", "backend"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.reloads = Counter(
            PREFIX + "config_reloads",
            "Config reloads by result.",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_reload_successful = Gauge(
            PREFIX + "config_last_reload_successful",
            "1 if the last reload attempt succeeded.",
            registry=self.registry,
        )
        self.last_reload_success_timestamp = Gauge(
            PREFIX + "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload.",
            registry=self.registry,
        )
        build = Gauge(
            PREFIX + "build_info", "Build information.", ["version"], registry=self.registry
        )
        build.labels(__version__).set(1)
        self._backends = backends
        self._duration_children: dict[tuple[str, str], Histogram] = {}

    def observe_duration(self, backend: Backend, seconds: float) -> None:
        key = (backend.listener, backend.name)
        child = self._duration_children.get(key)
        if child is None:
            child = self._duration_children[key] = self.duration.labels(
                backend.listener, backend.name
            )
        child.observe(seconds)

    def forget_backend(self, backend: Backend) -> None:
        """A backend drained away: report it `linger_s` longer, then drop its series."""
        self._lingering.append((time.monotonic() + self.linger_s, backend))
        self._prune()

    def _reported(self) -> Iterator[Backend]:
        self._prune()
        yield from self._backends()
        for _, backend in self._lingering:
            yield backend

    def _prune(self) -> None:
        now = time.monotonic()
        if not self._lingering or self._lingering[0][0] > now:
            return
        expired = [b for deadline, b in self._lingering if deadline <= now]
        self._lingering = [(d, b) for d, b in self._lingering if d > now]
        present = {(b.listener, b.name) for b in self._backends()}
        present.update((b.listener, b.name) for _, b in self._lingering)
        for backend in expired:
            key = (backend.listener, backend.name)
            if key in present:
                # Its name lives on (an address change): keep its counts in the series.
                self._carried.setdefault(key, _Carried()).add(backend)
                continue
            self._carried.pop(key, None)
            if self._duration_children.pop(key, None) is not None:
                self.duration.remove(backend.listener, backend.name)
