"""The Grafana dashboard (deploy/grafana/tcpproxy.json): built only from metrics tcpproxy
exposes (DESIGN §6), importable anywhere (data source picked on import), laid out cleanly,
and covering what an operator watches during a traffic shift."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tcpproxy.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tcpproxy.json"
GRID_COLUMNS = 24
LABELS = {"listener", "backend", "direction", "reason", "result", "version", "le", "state"}
# What the issue asks the dashboard to show, as the metric each view is built on.
REQUIRED = {
    "tcpproxy_connections_total",  # share of new connections per backend
    "tcpproxy_connections_active",
    "tcpproxy_bytes_total",
    "tcpproxy_backend_connect_failures_total",
    "tcpproxy_backend_draining",
    "tcpproxy_config_reloads_total",  # reload failures
    "tcpproxy_rollout_step",
    "tcpproxy_rollout_share_percent",
    "tcpproxy_rollout_state",
    "tcpproxy_rollout_weight",  # the weight share with a rollout's weights in place
}


@pytest.fixture(scope="module")
def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())


def exposed_series() -> set[str]:
    """Every sample name a tcpproxy scrape can hold, from the code's own registry."""
    names: set[str] = set()
    for family in Metrics(lambda: iter(())).registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def panels(dashboard: Any) -> list[Any]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def expressions(dashboard: Any) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def test_uses_only_metrics_tcpproxy_exposes(dashboard: Any) -> None:
    exposed = exposed_series()
    used = {name for expr in expressions(dashboard) for name in re.findall(r"tcpproxy_\w+", expr)}
    assert used <= exposed, used - exposed
    assert used >= REQUIRED, REQUIRED - used
    for expr in expressions(dashboard):
        for group in re.findall(r"\b(?:by|ignoring|on)\s*\(([^)]*)\)", expr):
            assert {label.strip() for label in group.split(",")} <= LABELS, expr


def test_queries_are_well_formed(dashboard: Any) -> None:
    for expr in expressions(dashboard):
        depth = {"(": 0, "[": 0, "{": 0}
        closing = {")": "(", "]": "[", "}": "{"}
        for char in expr:
            if char in depth:
                depth[char] += 1
            elif char in closing:
                depth[closing[char]] -= 1
                assert depth[closing[char]] >= 0, expr
        assert set(depth.values()) == {0}, expr
        # Ranges follow the scrape interval Grafana knows, never a hard-coded window.
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__rate_interval"}, expr
    for panel in panels(dashboard):
        for target in panel["targets"]:
            if "tcpproxy_config" in target["expr"] or "build_info" in target["expr"]:
                continue  # process-wide series have no listener
            assert 'listener=~"$listener"' in target["expr"], target["expr"]


def test_share_of_new_connections_per_backend(dashboard: Any) -> None:
    [share] = [p for p in panels(dashboard) if p["title"] == "Share of new connections per backend"]
    [target] = share["targets"]
    numerator, denominator = target["expr"].split(" / ")
    assert "sum by (listener, backend) (rate(tcpproxy_connections_total" in numerator
    assert "group_left sum by (listener) (rate(tcpproxy_connections_total" in denominator
    assert share["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert "{{backend}}" in target["legendFormat"]


def test_weight_share_puts_a_rollouts_weights_in_place_of_the_configured_ones(
    dashboard: Any,
) -> None:
    """A running rollout overrides its two backends' weights: the weight share must show
    the rollout's (tcpproxy_rollout_weight), and the configured weight of the others."""
    [panel] = [p for p in panels(dashboard) if p["title"].startswith("Weight share")]
    [target] = panel["targets"]
    weights = (
        '(max by (listener, backend) (tcpproxy_rollout_weight{listener=~"$listener"}) or '
        'max by (listener, backend) (tcpproxy_backend_weight{listener=~"$listener"}))'
    )
    assert (
        target["expr"] == f"{weights} / ignoring (backend) group_left sum by (listener) {weights}"
    )
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_has_rollout_panels(dashboard: Any) -> None:
    by_metric = {
        name: [
            p["title"] for p in panels(dashboard) if any(name in t["expr"] for t in p["targets"])
        ]
        for name in (
            "tcpproxy_rollout_share_percent",
            "tcpproxy_rollout_step",
            "tcpproxy_rollout_state",
        )
    }
    assert all(by_metric.values()), by_metric
    names = [a["name"] for a in dashboard["annotations"]["list"]]
    assert "Rollout steps" in names


def test_imports_with_a_data_source_chosen_on_import(dashboard: Any) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "tcpproxy_backend_weight" in variables["listener"]["definition"]
    source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(dashboard):
        assert panel["datasource"] == source, panel["title"]
        assert all(t["datasource"] == source for t in panel["targets"]), panel["title"]
    assert dashboard["uid"] == "tcpproxy"
    assert "__inputs" not in dashboard  # nothing to map: works in file provisioning too


def test_layout_has_unique_ids_and_no_overlaps(dashboard: Any) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    boxes = []
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0
        assert g["w"] > 0
        assert g["h"] > 0
        assert g["x"] + g["w"] <= GRID_COLUMNS, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for a, b in itertools.combinations(boxes, 2):
        overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
        assert not overlap, (a[0], b[0])
    for p in panels(dashboard):
        assert p["description"], p["title"]
