"""The fleet rollout examples: one rollout every replica runs, judged by the Prometheus that
scrapes them."""

from __future__ import annotations

import pytest
import yaml

from tcpproxy.config import parse_config
from tcpproxy.fleet import failure_query

from .test_kustomize import by_kind, named, render

EXAMPLES = {
    "examples/fleet-rollout": ("ServiceMonitor", "prometheus-operated.monitoring.svc"),
    "examples/fleet-rollout-gke": ("PodMonitoring", "frontend.gmp-public.svc"),
}


@pytest.mark.parametrize("directory", sorted(EXAMPLES))
def test_the_rollout_is_judged_by_the_prometheus_that_scrapes_the_replicas(
    directory: str,
) -> None:
    monitor_kind, prometheus_host = EXAMPLES[directory]
    docs = render(directory)
    text = named(docs, "ConfigMap", "tcpproxy-routes")["data"]["tcpproxy.yaml"]
    (listener,) = parse_config(text.encode(), directory).config.listeners
    rollout = listener.rollout
    assert rollout is not None
    assert rollout.abort.prometheus is not None
    assert prometheus_host in rollout.abort.prometheus.url
    # The window holds several scrapes of the monitor, or increase() has nothing to go on.
    (monitor,) = by_kind(docs, monitor_kind)
    interval = monitor["spec"]["endpoints"][0]["interval"]
    assert interval.endswith("s")
    assert rollout.abort.window >= 4 * int(interval.removesuffix("s"))
    # The replicas it judges are in the example, as the backends it shifts between.
    names = {d["metadata"]["name"] for d in by_kind(docs, "Service")}
    for backend in listener.backends:
        assert backend.address.split(":")[0] in names
    assert "tcpproxy_backend_connect_failures_total" in failure_query(listener.name, rollout)
    # The HorizontalPodAutoscaler makes a fleet of it.
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    assert yaml.safe_load(text)["listeners"][0]["rollout"]["from"] == "v1"
