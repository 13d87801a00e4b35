"""Every metric, defined once.

Per-backend figures (connections, bytes, weight, state, failures, connection durations) are
read from the live Backend objects at scrape time: the data path only adds to plain ints,
and a backend that has drained away simply stops being reported, so its series disappear.

A scrape must not hold up the data plane, whatever the number of backends: on the event
loop it only copies those figures into a Snapshot (plain tuples, one per backend); the text
(several MB with 10,000 backends) is written from the snapshot, and gzipped, in a thread of
its own. Concurrent scrapes share one snapshot and one text.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import gzip
import itertools
import operator
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import sleep
from typing import NamedTuple, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


# The `le` label values, as prometheus_client writes them ("1.0", "+Inf"): series names
# stay the same as before the histogram was kept here.
def _go_float(value: float) -> str:
    """A float as prometheus_client (after Go) writes it: "1.0", "1e+21", "+Inf"."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


_LE = (*(_go_float(b) for b in DURATION_BUCKETS_S), "+Inf")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GZIP_LEVEL = 6  # zlib's default: most of the gain (20x on this text) at a third of level 9's cost

Labels = tuple[str, str]  # (listener, backend)
T = TypeVar("T")


# -- what a scrape shows: the families, and one snapshot of their values --

# (name as exposed, type, help); counters are exposed with _total.
_CONNECTIONS = (PREFIX + "connections_total", "counter", "Connections routed to a backend.")
_ACTIVE = (PREFIX + "connections_active", "gauge", "Connections open now.")
_BYTES = (
    PREFIX + "bytes_total",
    "counter",
    "Bytes relayed; upstream = client->backend, downstream = backend->client.",
)
_FAILURES = (
    PREFIX + "backend_connect_failures_total",
    "counter",
    "Failed connection attempts to a backend.",
)
_CLOSED = (
    PREFIX + "connections_closed_total",
    "counter",
    "Closed connections by why they ended (the access log's `end`).",
)
_DRAINED = (
    PREFIX + "drain_closed_connections_total",
    "counter",
    "Connections closed by a drain deadline.",
)
_WEIGHT = (PREFIX + "backend_weight", "gauge", "Configured weight.")
_DRAINING = (PREFIX + "backend_draining", "gauge", "1 while the backend is draining.")
_UP = (PREFIX + "backend_up", "gauge", "1 healthy, 0 ejected.")
_DURATION = (
    PREFIX + "connection_duration_seconds",
    "histogram",
    "Lifetime of proxied connections.",
)
_ROLLOUT_STEP = (PREFIX + "rollout_step", "gauge", "Current rollout step, from 1.")
_ROLLOUT_SHARE = (
    PREFIX + "rollout_share_percent",
    "gauge",
    "The new backend's share of new connections under the rollout.",
)
_ROLLOUT_STATE = (PREFIX + "rollout_state", "gauge", "1 for the rollout's current state.")
_ROLLOUT_ABORTED = (
    PREFIX + "rollout_aborted",
    "gauge",
    "1 once this replica has aborted the rollout named by `rollout` (its identity).",
)
_ROLLOUT_INFO = (
    PREFIX + "rollout_info",
    "gauge",
    "The rollout in force: its identity, backends and steps (always 1).",
)
_ROLLOUT_WEIGHT = (
    PREFIX + "rollout_weight",
    "gauge",
    "The weight the rollout gives each of its two backends in place of the configured one, "
    "on the configured weights' scale (their sum, split by the step's share).",
)


class BackendRow(NamedTuple):
    """One backend series' figures (a name shared by an old and a new address is one)."""

    listener: str
    backend: str
    total: int
    active: int
    bytes_up: int
    bytes_down: int
    failures: tuple[int, ...]  # by CONNECT_FAILURE_REASONS
    ends: tuple[tuple[str, int], ...]  # (end reason, count), sorted
    drain_closed: int
    weight: int
    draining: int
    up: int


class DurationRow(NamedTuple):
    listener: str
    backend: str
    counts: tuple[int, ...]  # cumulative, one per bucket and +Inf last
    total_s: float


class RolloutRow(NamedTuple):
    listener: str
    step: int
    backend: str
    share: float
    state: str
    identity: str
    from_: str
    steps: str  # "5,25,50,100"
    from_weight: float
    to_weight: float


# One Backend's figures (or the counts carried for its name): listener, name, total, active,
# bytes up, bytes down, failures by reason, ends, drain closes, weight, draining, up.
_Raw = tuple[str, str, int, int, int, int, tuple[int, ...], dict[str, int], int, int, bool, bool]
_failures_of = operator.itemgetter(*CONNECT_FAILURE_REASONS)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The figures of one moment, copied on the event loop; rows are made from it anywhere.

    Kept as columns (one list per figure, the dicts copied) rather than a tuple per
    backend: the copy then makes no object the garbage collector must go through, which
    would cost the loop more than the copy itself."""

    listeners: list[str]
    names: list[str]
    totals: list[int]
    active: list[int]
    bytes_up: list[int]
    bytes_down: list[int]
    failures: list[dict[str, int]]
    ends: list[dict[str, int]]
    drain_closed: list[int]
    weights: list[int]
    draining: list[bool]
    up: list[bool]
    carried: dict[Labels, _Raw]
    durations: tuple[list[str], list[str], list[int], list[float]]  # counts not cumulative
    rollouts: tuple[RolloutRow, ...]

    def _raws(self) -> Iterator[_Raw]:
        return zip(
            self.listeners,
            self.names,
            self.totals,
            self.active,
            self.bytes_up,
            self.bytes_down,
            map(_failures_of, self.failures),
            self.ends,
            self.drain_closed,
            self.weights,
            self.draining,
            self.up,
            strict=True,
        )

    def backend_rows(self, yielding: bool = False) -> list[BackendRow]:
        """`yielding`: let the event loop's thread run now and then (see _yielding)."""
        # Changing a backend's address makes a second Backend with the same labels while
        # the old one drains: report them as one series, never as duplicate samples.
        groups: dict[Labels, list[_Raw]] = {}
        raws = self._raws()
        for raw in _yielding(raws) if yielding else raws:
            groups.setdefault((raw[0], raw[1]), []).append(raw)
        carried = self.carried
        rows = []
        items = groups.items()
        for key, same in _yielding(items) if yielding else items:
            if len(same) == 1 and key not in carried:
                # The usual case, and the one 10,000 backends repeat: no sums.
                raw = same[0]
                rows.append(
                    BackendRow(
                        *raw[:7],
                        tuple(sorted(raw[7].items())),
                        raw[8],
                        0 if raw[10] else raw[9],
                        1 if raw[10] else 0,
                        1 if raw[11] else 0,
                    )
                )
                continue
            everything = [*same, carried[key]] if key in carried else same
            configured = [raw for raw in same if not raw[10]]
            end_counts: dict[str, int] = {}
            for raw in everything:
                for reason, n in raw[7].items():
                    end_counts[reason] = end_counts.get(reason, 0) + n
            rows.append(
                BackendRow(
                    key[0],
                    key[1],
                    sum(raw[2] for raw in everything),
                    sum(raw[3] for raw in same),
                    sum(raw[4] for raw in everything),
                    sum(raw[5] for raw in everything),
                    tuple(sum(n) for n in zip(*(raw[6] for raw in everything), strict=True)),
                    tuple(sorted(end_counts.items())),
                    sum(raw[8] for raw in everything),
                    configured[0][9] if configured else 0,
                    0 if configured else 1,
                    1 if all(raw[11] for raw in same) else 0,
                )
            )
        return rows

    def duration_rows(self) -> list[DurationRow]:
        listeners, names, counts, sums = self.durations
        size = len(DURATION_BUCKETS_S) + 1
        return [
            DurationRow(
                listener,
                name,
                tuple(itertools.accumulate(counts[i * size : (i + 1) * size])),
                total_s,
            )
            for i, (listener, name, total_s) in enumerate(zip(listeners, names, sums, strict=True))
        ]


def _snapshot(
    backends: list[Backend],
    live: int,
    carried: dict[Labels, _Carried],
    durations: dict[Labels, _Durations],
    rollouts: tuple[RolloutRow, ...],
) -> Snapshot:
    counts: list[int] = []
    for series in durations.values():
        counts += series.counts
    return Snapshot(
        [b.listener for b in backends],
        [b.name for b in backends],
        [b.total for b in backends],
        [len(b.connections) for b in backends],
        [b.bytes_up() if b.connections else b.bytes_up_closed for b in backends],
        [b.bytes_down() if b.connections else b.bytes_down_closed for b in backends],
        [b.connect_failures.copy() for b in backends],
        [b.ends.copy() for b in backends],
        [b.drain_closed for b in backends],
        [b.weight for b in backends],
        # Past `live`, backends that drained away and linger for a last scrape: no longer
        # draining, whatever their deadline was.
        [i < live and b.drain_deadline is not None for i, b in enumerate(backends)],
        [b.healthy and not b.ejected for b in backends],
        {key: c.raw(key) for key, c in carried.items()},
        (
            [key[0] for key in durations],
            [key[1] for key in durations],
            counts,
            [series.total_s for series in durations.values()],
        ),
        rollouts,
    )


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

    def raw(self, key: Labels) -> _Raw:
        """As a drained Backend's figures: nothing active, no weight, up."""
        return (
            key[0],
            key[1],
            self.total,
            0,
            self.bytes_up,
            self.bytes_down,
            _failures_of(self.connect_failures),
            self.ends.copy(),
            self.drain_closed,
            0,
            True,
            True,
        )


class _Durations:
    """One series of the duration histogram: counts per bucket (not cumulative), and sum."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.total_s = 0.0


def _rollout_rows(rollouts: Iterable[tuple[str, Rollout]]) -> tuple[RolloutRow, ...]:
    return tuple(
        RolloutRow(
            listener,
            min(rollout.applied_step, len(rollout.config.steps) - 1) + 1,
            rollout.config.to,
            rollout.applied_share,
            rollout.state,
            rollout.identity,
            rollout.config.from_,
            ",".join(map(str, rollout.config.steps)),
            # On the configured weights' scale: the pair's sum split by the share.
            rollout.pair_weight * (100 - rollout.applied_share) / 100,
            rollout.pair_weight * rollout.applied_share / 100,
        )
        for listener, rollout in rollouts
    )


# -- the families as prometheus_client objects (registry.collect(), tests) --


def _counter(spec: tuple[str, str, str], labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(spec[0].removesuffix("_total"), spec[2], labels=labels)


def _gauge(spec: tuple[str, str, str], labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec[0], spec[2], labels=labels)


def _families(snapshot: Snapshot) -> Iterator[Metric]:
    lb = ["listener", "backend"]
    total, active, drained = _counter(_CONNECTIONS, lb), _gauge(_ACTIVE, lb), _counter(_DRAINED, lb)
    traffic = _counter(_BYTES, [*lb, "direction"])
    failures, closed = _counter(_FAILURES, [*lb, "reason"]), _counter(_CLOSED, [*lb, "reason"])
    weight, draining, up = _gauge(_WEIGHT, lb), _gauge(_DRAINING, lb), _gauge(_UP, lb)
    for r in snapshot.backend_rows():
        labels = [r.listener, r.backend]
        total.add_metric(labels, r.total)
        active.add_metric(labels, r.active)
        traffic.add_metric([*labels, "upstream"], r.bytes_up)
        traffic.add_metric([*labels, "downstream"], r.bytes_down)
        for reason, n in zip(CONNECT_FAILURE_REASONS, r.failures, strict=True):
            failures.add_metric([*labels, reason], n)
        for reason, n in r.ends:
            closed.add_metric([*labels, reason], n)
        drained.add_metric(labels, r.drain_closed)
        weight.add_metric(labels, r.weight)
        draining.add_metric(labels, r.draining)
        up.add_metric(labels, r.up)
    duration = HistogramMetricFamily(_DURATION[0], _DURATION[2], labels=lb)
    for d in snapshot.duration_rows():
        buckets = [(le, float(n)) for le, n in zip(_LE, d.counts, strict=True)]
        duration.add_metric([d.listener, d.backend], buckets, d.total_s)
    step = _gauge(_ROLLOUT_STEP, ["listener"])
    share = _gauge(_ROLLOUT_SHARE, ["listener", "backend"])
    state = _gauge(_ROLLOUT_STATE, ["listener", "state"])
    aborted = _gauge(_ROLLOUT_ABORTED, ["listener", "rollout"])
    info = _gauge(_ROLLOUT_INFO, ["listener", "rollout", "from", "to", "steps"])
    rollout_weight = _gauge(_ROLLOUT_WEIGHT, ["listener", "backend"])
    for ro in snapshot.rollouts:
        step.add_metric([ro.listener], ro.step)
        share.add_metric([ro.listener, ro.backend], ro.share)
        for name in ROLLOUT_STATES:
            state.add_metric([ro.listener, name], 1 if ro.state == name else 0)
        aborted.add_metric([ro.listener, ro.identity], 1 if ro.state == "aborted" else 0)
        info.add_metric([ro.listener, ro.identity, ro.from_, ro.backend, ro.steps], 1)
        rollout_weight.add_metric([ro.listener, ro.from_], ro.from_weight)
        rollout_weight.add_metric([ro.listener, ro.backend], ro.to_weight)
    yield from (total, active, traffic, failures, closed, drained, weight, draining, up)
    yield from (duration, step, share, state, aborted, info, rollout_weight)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from _families(self._snapshot())


# -- the same families written as text, fast, from a snapshot (in a thread) --


# The scrape thread lets go of the interpreter lock this often (items): the event loop's
# thread, waiting for it, would otherwise wait the switch interval (5 ms) each time.
YIELD_EVERY = 256


def _yielding(items: Iterable[T]) -> Iterator[T]:
    for i, item in enumerate(items):
        if not i % YIELD_EVERY:
            sleep(0)  # releases the lock: a waiting thread takes it
        yield item


@contextlib.contextmanager
def _no_gc() -> Generator[None, None, None]:
    """No garbage collection while a snapshot or a text is made: they allocate a tuple or a
    string per sample, which would start collections of every object the proxy holds (most
    of a snapshot's cost on the loop, and a pause of the loop while the thread holds the
    interpreter lock). Collection resumes after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _number(value: float) -> str:
    """Whole numbers without ".0" (most samples are counts); the rest as prometheus_client
    writes them."""
    if isinstance(value, int):
        return str(value)
    return _go_float(value)


def _header(out: list[str], spec: tuple[str, str, str]) -> None:
    name, kind, help_text = spec
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")


def render(snapshot: Snapshot, registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (0.0.4) of `snapshot` and of the metrics in `registry`
    (prometheus_client's own, safe to read from any thread)."""
    with _no_gc():
        return _render(snapshot, registry)


def _render(snapshot: Snapshot, registry: CollectorRegistry) -> bytes:
    out: list[str] = []
    put = out.append
    backend_rows = snapshot.backend_rows(yielding=True)
    labels = [
        f'listener="{_escape(r.listener)}",backend="{_escape(r.backend)}"' for r in backend_rows
    ]
    rows = list(zip(labels, backend_rows, strict=True))
    name = _CONNECTIONS[0]
    _header(out, _CONNECTIONS)
    for lab, r in _yielding(rows):
        put(f"{name}{{{lab}}} {r.total}\n")
    name = _ACTIVE[0]
    _header(out, _ACTIVE)
    for lab, r in _yielding(rows):
        put(f"{name}{{{lab}}} {r.active}\n")
    name = _BYTES[0]
    _header(out, _BYTES)
    for lab, r in _yielding(rows):
        put(f'{name}{{{lab},direction="upstream"}} {r.bytes_up}\n')
        put(f'{name}{{{lab},direction="downstream"}} {r.bytes_down}\n')
    name = _FAILURES[0]
    _header(out, _FAILURES)
    for lab, r in _yielding(rows):
        for reason, n in zip(CONNECT_FAILURE_REASONS, r.failures, strict=True):
            put(f'{name}{{{lab},reason="{reason}"}} {n}\n')
    name = _CLOSED[0]
    _header(out, _CLOSED)
    for lab, r in _yielding(rows):
        for reason, n in r.ends:
            put(f'{name}{{{lab},reason="{_escape(reason)}"}} {n}\n')
    for spec, attr in ((_DRAINED, "drain_closed"), (_WEIGHT, "weight"), (_DRAINING, "draining")):
        name = spec[0]
        _header(out, spec)
        for lab, r in _yielding(rows):
            put(f"{name}{{{lab}}} {getattr(r, attr)}\n")
    name = _UP[0]
    _header(out, _UP)
    for lab, r in _yielding(rows):
        put(f"{name}{{{lab}}} {r.up}\n")
    name = _DURATION[0]
    _header(out, _DURATION)
    for d in _yielding(snapshot.duration_rows()):
        lab = f'listener="{_escape(d.listener)}",backend="{_escape(d.backend)}"'
        for le, n in zip(_LE, d.counts, strict=True):
            put(f'{name}_bucket{{{lab},le="{le}"}} {n}\n')
        put(f"{name}_count{{{lab}}} {d.counts[-1]}\n")
        put(f"{name}_sum{{{lab}}} {_number(d.total_s)}\n")
    _header(out, _ROLLOUT_STEP)
    for ro in snapshot.rollouts:
        put(f'{_ROLLOUT_STEP[0]}{{listener="{_escape(ro.listener)}"}} {ro.step}\n')
    _header(out, _ROLLOUT_SHARE)
    for ro in snapshot.rollouts:
        lab = f'listener="{_escape(ro.listener)}",backend="{_escape(ro.backend)}"'
        put(f"{_ROLLOUT_SHARE[0]}{{{lab}}} {_number(ro.share)}\n")
    _header(out, _ROLLOUT_STATE)
    for ro in snapshot.rollouts:
        for state in ROLLOUT_STATES:
            lab = f'listener="{_escape(ro.listener)}",state="{state}"'
            put(f"{_ROLLOUT_STATE[0]}{{{lab}}} {1 if ro.state == state else 0}\n")
    _header(out, _ROLLOUT_ABORTED)
    for ro in snapshot.rollouts:
        lab = f'listener="{_escape(ro.listener)}",rollout="{ro.identity}"'
        put(f"{_ROLLOUT_ABORTED[0]}{{{lab}}} {1 if ro.state == 'aborted' else 0}\n")
    _header(out, _ROLLOUT_INFO)
    for ro in snapshot.rollouts:
        lab = (
            f'listener="{_escape(ro.listener)}",rollout="{ro.identity}",'
            f'from="{_escape(ro.from_)}",to="{_escape(ro.backend)}",steps="{ro.steps}"'
        )
        put(f"{_ROLLOUT_INFO[0]}{{{lab}}} 1\n")
    _header(out, _ROLLOUT_WEIGHT)
    for ro in snapshot.rollouts:
        for backend, weight in ((ro.from_, ro.from_weight), (ro.backend, ro.to_weight)):
            lab = f'listener="{_escape(ro.listener)}",backend="{_escape(backend)}"'
            put(f"{_ROLLOUT_WEIGHT[0]}{{{lab}}} {_number(weight)}\n")
    # Joined and encoded in slices: one join of the whole text would hold the interpreter
    # lock, and so the event loop, for as long as it takes to copy it.
    step = 4096
    parts = [generate_latest(registry)]
    parts += ["".join(out[i : i + step]).encode() for i in range(0, len(out), step)]
    return b"".join(parts)


class Metrics:
    """One registry per proxy, so that several proxies can live in one process (tests)."""

    def __init__(
        self,
        backends: Callable[[], Iterable[Backend]],
        linger_s: float = DEFAULT_LINGER_S,
        rollouts: Callable[[], Iterable[tuple[str, Rollout]]] = tuple,
    ) -> None:
        # `registry` has every metric (collected on the event loop); `_plain` only
        # prometheus_client's own, which the scrape thread may read.
        self.registry = CollectorRegistry(auto_describe=False)
        self._plain = CollectorRegistry(auto_describe=False)
        self._carried: dict[Labels, _Carried] = {}
        self._durations: dict[Labels, _Durations] = {}
        self._rollouts = rollouts
        self.registry.register(_SnapshotCollector(self.snapshot))
        self.linger_s = linger_s
        # Drained-away backends, reported until their deadline (monotonic seconds).
        self._lingering: list[tuple[float, Backend]] = []
        self.rejected = Counter(
            PREFIX + "connections_rejected",
            "Connections accepted and closed without a backend.",
            ["listener", "reason"],
            registry=None,
        )
        self.reloads = Counter(
            PREFIX + "config_reloads",
            "Config reloads by result.",
            ["result"],
            registry=None,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_reload_successful = Gauge(
            PREFIX + "config_last_reload_successful",
            "1 if the last reload attempt succeeded.",
            registry=None,
        )
        self.last_reload_success_timestamp = Gauge(
            PREFIX + "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload.",
            registry=None,
        )
        self.rollout_prometheus_up = Gauge(
            PREFIX + "rollout_prometheus_up",
            "1 while the rollout's Prometheus judge answers, 0 during an outage.",
            ["listener"],
            registry=None,
        )
        self.rollout_prometheus_errors = Counter(
            PREFIX + "rollout_prometheus_errors",
            "Queries to the rollout's Prometheus judge that failed or timed out.",
            ["listener"],
            registry=None,
        )
        build = Gauge(PREFIX + "build_info", "Build information.", ["version"], registry=None)
        build.labels(__version__).set(1)
        for metric in (
            self.rejected,
            self.reloads,
            self.last_reload_successful,
            self.last_reload_success_timestamp,
            self.rollout_prometheus_up,
            self.rollout_prometheus_errors,
            build,
        ):
            self.registry.register(metric)
            self._plain.register(metric)
        self._backends = backends
        self._executor: ThreadPoolExecutor | None = None
        self._rendering: asyncio.Future[bytes] | None = None

    def observe_duration(self, backend: Backend, seconds: float) -> None:
        key = (backend.listener, backend.name)
        series = self._durations.get(key)
        if series is None:
            series = self._durations[key] = _Durations()
        series.counts[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        series.total_s += seconds

    def forget_backend(self, backend: Backend) -> None:
        """A backend drained away: report it `linger_s` longer, then drop its series."""
        self._lingering.append((time.monotonic() + self.linger_s, backend))
        self._prune()

    def snapshot(self) -> Snapshot:
        """Every per-backend and rollout figure as it is now: a copy, on the event loop."""
        with _no_gc():
            self._prune()
            live = list(self._backends())
            return _snapshot(
                live + [backend for _, backend in self._lingering],
                len(live),
                self._carried,
                self._durations,
                _rollout_rows(self._rollouts()),
            )

    async def exposition(self, accept_gzip: bool = False) -> tuple[bytes, bool]:
        """The text for a scrape, gzipped when the client accepts it: (body, gzipped).
        Only the snapshot is taken on the event loop; a scrape that comes while another is
        being written gets that one's text."""
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="tcpproxy-metrics")
        if self._rendering is None or self._rendering.done():
            self._rendering = loop.run_in_executor(
                self._executor, render, self.snapshot(), self._plain
            )
        text = await asyncio.shield(self._rendering)
        if not accept_gzip:
            return text, False
        body = await loop.run_in_executor(self._executor, gzip.compress, text, GZIP_LEVEL)
        return body, True

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
            self._durations.pop(key, None)
