"""The fleet judge's pure parts: the queries it sends, how it reads answers, what it decides."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.config import RolloutConfig
from tcpproxy.fleet import (
    QueryError,
    aborted_query,
    decide,
    failure_query,
    matchers,
    promql_duration,
    query_value,
)


def config(**abort: object) -> RolloutConfig:
    return RolloutConfig.model_validate(
        {
            "from": "v1",
            "to": "v2",
            "steps": [10, 50],
            "step_duration": "10m",
            "abort": {"prometheus": {"url": "http://prom:9090/"}, **abort},
        }
    )


def test_the_default_query_is_the_fleets_failure_ratio_once_there_were_enough_attempts() -> None:
    query = failure_query("app", config(window="90s", min_attempts=7))
    where = '{listener="app",backend="v2"}'
    failures = f"sum(increase(tcpproxy_backend_connect_failures_total{where}[90s]))"
    connected = f"sum(increase(tcpproxy_connections_total{where}[90s]))"
    assert query == (
        f"({failures} / ({connected} + {failures})) and on() (({connected} + {failures}) >= 7)"
    )


def test_a_query_of_ones_own_and_a_selector_are_used_as_given() -> None:
    custom = config(prometheus={"url": "http://p:9090", "query": "my_ratio > 0"})
    assert failure_query("app", custom) == "my_ratio > 0"
    scoped = config(prometheus={"url": "http://p:9090", "selector": 'namespace="shop"'})
    assert '{listener="app",backend="v2",namespace="shop"}' in failure_query("app", scoped)
    prometheus = scoped.abort.prometheus
    assert prometheus is not None
    assert prometheus.url == "http://p:9090"
    assert aborted_query("abc123", prometheus) == (
        'max(max_over_time(tcpproxy_rollout_aborted{rollout="abc123",namespace="shop"}[1d])) > 0'
    )


@given(st.text(min_size=1))
def test_label_values_are_quoted_so_no_name_can_break_out_of_the_selector(value: str) -> None:
    text = matchers("", listener=value)
    inner = text[len('{listener="') : -2]
    # Undo PromQL's escapes: the value comes back whole, and no quote is left unescaped.
    assert inner.replace('\\"', '"').replace("\\\\", "\\") == value
    assert '"' not in inner.replace('\\"', "").replace("\\\\", "")


@given(st.floats(min_value=0.001, max_value=1e6))
def test_durations_are_exact_promql_ranges(seconds: float) -> None:
    text = promql_duration(seconds)
    number = int(text.removesuffix("ms").removesuffix("s"))
    value = number / 1000 if text.endswith("ms") else number
    assert math.isclose(value, round(seconds * 1000) / 1000, abs_tol=1e-9)


def vector(*values: str) -> dict[str, Any]:
    result = [{"metric": {}, "value": [1.0, v]} for v in values]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def test_answers_are_read_as_a_number_or_no_number() -> None:
    assert query_value(vector()) is None  # too few attempts: no decision
    assert query_value(vector("0.25")) == 0.25
    assert query_value(vector("0.1", "0.4")) == 0.4
    assert query_value(vector("NaN")) is None
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "1"]}}
    assert query_value(scalar) == 1.0


@pytest.mark.parametrize(
    "body",
    [
        {"status": "error", "error": "parse error"},
        {"status": "success", "data": {"resultType": "matrix", "result": []}},
        {"status": "success", "data": {"resultType": "vector", "result": [{"value": []}]}},
        {"status": "success"},
        ["not", "a", "dict"],
    ],
)
def test_anything_else_is_an_error_not_a_decision(body: object) -> None:
    with pytest.raises(QueryError):
        query_value(body)


@given(
    aborted=st.none() | st.floats(0, 1),
    ratio=st.none() | st.floats(0, 1),
    limit=st.floats(0.01, 1),
)
def test_the_decision(aborted: float | None, ratio: float | None, limit: float) -> None:
    reason = decide(aborted, ratio, limit, "v2")
    tripped = (aborted is not None and aborted > 0) or (ratio is not None and ratio > limit)
    assert (reason is not None) == tripped
    if aborted is not None and aborted > 0:
        assert reason == "another replica aborted this rollout"
