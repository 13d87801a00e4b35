"""The /metrics text written from a snapshot (off the event loop) says exactly what
prometheus_client's own writer says for the same figures, whatever the backends hold."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tcpproxy.backend import CONNECT_FAILURE_REASONS, Backend
from tcpproxy.config import BackendConfig, RolloutConfig
from tcpproxy.metrics import Metrics, render
from tcpproxy.rollout import STATES, Rollout

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(eq=False)
class Conn:
    bytes_up: int
    bytes_down: int


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


counts = st.integers(0, 10**12)


@st.composite
def backend(draw: st.DrawFn, listener: str, name: str, address: str) -> Backend:
    b = Backend(
        listener, BackendConfig(name=name, address=address, weight=draw(st.integers(0, 100)))
    )
    b.total = draw(counts)
    b.bytes_up_closed, b.bytes_down_closed = draw(counts), draw(counts)
    for up, down in draw(st.lists(st.tuples(counts, counts), max_size=3)):
        b.connections.add(Conn(up, down))  # type: ignore[arg-type]
    for reason in CONNECT_FAILURE_REASONS:
        b.connect_failures[reason] = draw(counts)
    b.ends = draw(
        st.dictionaries(
            st.one_of(
                st.sampled_from(["client_closed", "backend_reset", "idle_timeout"]),
                st.text(max_size=5),  # quotes, backslashes, newlines: escaped alike
            ),
            counts,
        )
    )
    b.drain_closed = draw(counts)
    b.healthy, b.ejected = draw(st.booleans()), draw(st.booleans())
    if draw(st.booleans()):
        b.drain_deadline = 1.0
    return b


@st.composite
def proxies(draw: st.DrawFn) -> Metrics:
    backends: list[Backend] = []
    for listener in draw(st.lists(st.sampled_from(["l1", "l2", "a.b-c_d"]), unique=True)):
        for i in range(draw(st.integers(0, 4))):
            backends.append(draw(backend(listener, f"b{i}", f"10.0.0.{i + 1}:80")))
            if draw(st.booleans()):  # an address change: the old one drains, same name
                backends.append(draw(backend(listener, f"b{i}", f"10.0.1.{i + 1}:80")))
    rollouts = []
    for listener in draw(st.lists(st.sampled_from(["l1", "l2"]), unique=True)):
        config = RolloutConfig.model_validate(
            {"from": "b0", "to": "b1", "steps": [5, 50, 100], "step_duration": 60}
        )
        rollout = Rollout(config, config.identity(listener), 0.0)
        state = draw(st.sampled_from(STATES))
        rollout.local_abort = "judged" if state == "aborted" else None
        rollout.done = state == "completed"
        rollout.local_paused_since = 0.0 if state == "paused" else None
        assert rollout.state == state
        rollout.applied_step = draw(st.integers(0, 5))
        rollout.applied_share = draw(st.integers(0, 100))
        rollouts.append((listener, rollout))
    metrics = Metrics(lambda: iter(backends), 0.0, lambda: iter(rollouts))
    for b in backends:
        for seconds in draw(
            st.lists(st.floats(0, 10**6, allow_nan=False, allow_infinity=False), max_size=4)
        ):
            metrics.observe_duration(b, seconds)
    for listener, reason in draw(st.lists(st.tuples(st.sampled_from(["l1", "l2"]), st.text()))):
        metrics.rejected.labels(listener, reason).inc()
    return metrics


@given(proxies())
def test_the_text_says_what_prometheus_client_says(metrics: Metrics) -> None:
    fast = samples(render(metrics.snapshot(), metrics._plain).decode())
    reference = samples(generate_latest(metrics.registry).decode())

    assert fast.keys() == reference.keys()
    for key, value in reference.items():
        assert math.isclose(fast[key], value, rel_tol=1e-15), key


def test_whole_numbers_are_written_without_a_fraction() -> None:
    b = Backend("l", BackendConfig(name="v1", address="10.0.0.1:80", weight=3))
    b.total = 12
    metrics = Metrics(lambda: iter([b]))
    metrics.observe_duration(b, 0.25)

    text = render(metrics.snapshot(), metrics._plain).decode()

    assert 'tcpproxy_connections_total{listener="l",backend="v1"} 12\n' in text
    assert 'tcpproxy_backend_weight{listener="l",backend="v1"} 3\n' in text
    # The bucket bounds are the ones prometheus_client wrote: the series keep their names.
    le = 'tcpproxy_connection_duration_seconds_bucket{listener="l",backend="v1",le="1.0"} 1\n'
    assert le in text
    assert 'tcpproxy_connection_duration_seconds_sum{listener="l",backend="v1"} 0.25\n' in text
