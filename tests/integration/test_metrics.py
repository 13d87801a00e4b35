"""Every metric of DESIGN §6, scraped from the real /metrics over HTTP after real traffic."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from tcpproxy import __version__
from tcpproxy.proxy import Proxy
from tests.harness import (
    Backends,
    Client,
    LoopThread,
    RunningProxy,
    clients,
    config_yaml,
    free_port,
    listener_yaml,
    wait_until,
)
from tests.integration import admin_http
from tests.integration.admin_http import Admin, Scrape

Start = Callable[[str], RunningProxy]
StartAdmin = Callable[[Proxy], Admin]
admins = pytest.fixture(admin_http.admins)

# Every series name a scrape may hold, and every label a series may carry: never a client
# address or a connection id.
SERIES = {
    "tcpproxy_connections_total",
    "tcpproxy_connections_active",
    "tcpproxy_connections_rejected_total",
    "tcpproxy_backend_connect_failures_total",
    "tcpproxy_bytes_total",
    "tcpproxy_connection_duration_seconds_bucket",
    "tcpproxy_connection_duration_seconds_count",
    "tcpproxy_connection_duration_seconds_sum",
    "tcpproxy_drain_closed_connections_total",
    "tcpproxy_connections_closed_total",  # beyond DESIGN §6: closes by end reason
    "tcpproxy_backend_weight",
    "tcpproxy_backend_draining",
    "tcpproxy_backend_up",
    "tcpproxy_config_reloads_total",
    "tcpproxy_config_last_reload_successful",
    "tcpproxy_config_last_reload_success_timestamp_seconds",
    "tcpproxy_build_info",
}
LABELS = {"listener", "backend", "direction", "reason", "result", "version", "le"}
PER_BACKEND = [
    "tcpproxy_connections_total",
    "tcpproxy_connections_active",
    "tcpproxy_drain_closed_connections_total",
    "tcpproxy_backend_weight",
    "tcpproxy_backend_draining",
    "tcpproxy_backend_up",
]
GREETING = len("hello from v1\n")


def two_backends(port: int, v1: str, v2: str, w1: int, w2: int, **options: object) -> str:
    return config_yaml(listener_yaml("app", port, {"v1": (v1, w1), "v2": (v2, w2)}, **options))


def idle(running: RunningProxy) -> None:
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0, what="all closed")


@pytest.mark.parametrize("engine", ["copy", "splice"])
def test_counters_after_real_traffic_are_exact(
    backends: Backends, start_proxy: Start, admins: StartAdmin, engine: str
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 2, 1, engine=engine))
    admin = admins(running.proxy)
    expected = {"v1": [0, 0, 0], "v2": [0, 0, 0]}  # connections, bytes up, bytes down

    # Open connections count, and their bytes are counted before they close.
    with clients(port, 3) as held:
        names = [c.greeting() for c in held]
        assert sorted(names) == ["v1", "v1", "v2"]
        for i, (c, name) in enumerate(zip(held, names, strict=True)):
            payload = b"x" * (10 + i)
            assert c.echo(payload) == payload
            expected[name][0] += 1
            expected[name][1] += len(payload)
            expected[name][2] += GREETING + len(payload)
        scrape = admin.scrape()
        for name in ("v1", "v2"):
            labels = {"listener": "app", "backend": name}
            assert scrape.value("tcpproxy_connections_active", **labels) == names.count(name)
            assert scrape.value("tcpproxy_connections_total", **labels) == names.count(name)
            assert (
                scrape.value("tcpproxy_bytes_total", direction="upstream", **labels)
                == (expected[name][1])
            )
            assert (
                scrape.value("tcpproxy_bytes_total", direction="downstream", **labels)
                == (expected[name][2])
            )
    # Then a few short-lived ones, one after another.
    for i in range(6):
        c = Client(port)
        name = c.greeting()
        payload = bytes(range(256)) * (i + 1)
        assert c.echo(payload) == payload
        c.close()
        expected[name][0] += 1
        expected[name][1] += len(payload)
        expected[name][2] += GREETING + len(payload)
    idle(running)

    scrape = admin.scrape()
    assert expected["v1"][0] == 6
    assert expected["v2"][0] == 3
    for name, (conns, up, down) in expected.items():
        labels = {"listener": "app", "backend": name}
        assert scrape.value("tcpproxy_connections_total", **labels) == conns
        assert scrape.value("tcpproxy_connections_active", **labels) == 0
        assert scrape.value("tcpproxy_bytes_total", direction="upstream", **labels) == up
        assert scrape.value("tcpproxy_bytes_total", direction="downstream", **labels) == down
        assert scrape.value("tcpproxy_connection_duration_seconds_count", **labels) == conns
        assert scrape.value("tcpproxy_connection_duration_seconds_bucket", le="+Inf", **labels) == (
            conns
        )
        assert scrape.value("tcpproxy_drain_closed_connections_total", **labels) == 0
        assert scrape.value("tcpproxy_backend_draining", **labels) == 0
        assert scrape.value("tcpproxy_backend_up", **labels) == 1
        for reason in ("refused", "timeout", "dns", "other"):
            assert (
                scrape.value("tcpproxy_backend_connect_failures_total", reason=reason, **labels)
                == 0
            )
    assert scrape.value("tcpproxy_backend_weight", listener="app", backend="v1") == 2
    assert scrape.value("tcpproxy_backend_weight", listener="app", backend="v2") == 1
    for reason in ("no_backend", "max_connections", "connect_failed"):
        assert (
            scrape.value("tcpproxy_connections_rejected_total", listener="app", reason=reason) == 0
        )
    assert scrape.value("tcpproxy_config_reloads_total", result="success") == 1
    assert scrape.value("tcpproxy_config_reloads_total", result="failure") == 0
    assert scrape.value("tcpproxy_config_last_reload_successful") == 1
    loaded_at = running.state(lambda p: p.loaded_at)
    assert scrape.value("tcpproxy_config_last_reload_success_timestamp_seconds") == loaded_at
    assert scrape.value("tcpproxy_build_info", version=__version__) == 1
    assert {name for name, _ in scrape.samples} == SERIES
    assert_contract(scrape)


def assert_contract(scrape: Scrape) -> None:
    """Only DESIGN §6 names, only the allowed labels, no addresses in label values."""
    assert {name for name, _ in scrape.samples} <= SERIES
    for _, labels in scrape.samples:
        assert {key for key, _ in labels} <= LABELS
        assert not any("127.0.0.1" in value for _, value in labels)
    assert scrape.types["tcpproxy_connections"] == "counter"
    assert scrape.types["tcpproxy_connections_active"] == "gauge"
    assert scrape.types["tcpproxy_connection_duration_seconds"] == "histogram"


def test_rejections_and_connect_failures_are_counted(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    v1 = backends.start("v1")
    dead1, dead2 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # refuse
    retry, none, full, down = free_port(), free_port(), free_port(), free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml("retry", retry, {"dead": (dead1, 1), "v1": (v1, 1)}),
            listener_yaml("none", none, {"v1": (v1, 0)}),
            listener_yaml("full", full, {"v1": (v1, 1)}, max_connections_per_client=1),
            listener_yaml("down", down, {"d1": (dead1, 1), "d2": (dead2, 1)}),
        )
    )
    admin = admins(running.proxy)
    # `retry`: every second new connection picks the dead backend first, then gets v1.
    for _ in range(4):
        c = Client(retry)
        assert c.greeting() == "v1"
        c.close()
    # `none`: no eligible backend; `down`: both refuse (each tried once, never twice).
    for rejected_port in (none, down):
        c = Client(rejected_port)
        assert c.is_closed()
        c.close()
    # `full`: the second connection from this client's address is over its limit.
    with clients(full, 1) as held:
        assert held[0].greeting() == "v1"
        extra = Client(full)
        assert extra.is_closed()
        extra.close()
    idle(running)

    scrape = admin.scrape()

    def failures(listener: str, backend: str, reason: str) -> float | None:
        return scrape.value(
            "tcpproxy_backend_connect_failures_total",
            listener=listener,
            backend=backend,
            reason=reason,
        )

    def rejected(listener: str, reason: str) -> float | None:
        return scrape.value("tcpproxy_connections_rejected_total", listener=listener, reason=reason)

    assert failures("retry", "dead", "refused") == 2
    assert failures("retry", "dead", "timeout") == 0
    assert failures("retry", "v1", "refused") == 0
    assert scrape.value("tcpproxy_connections_total", listener="retry", backend="v1") == 4
    assert scrape.value("tcpproxy_connections_total", listener="retry", backend="dead") == 0
    assert rejected("retry", "connect_failed") == 0
    assert rejected("none", "no_backend") == 1
    assert scrape.value("tcpproxy_connections_total", listener="none", backend="v1") == 0
    assert failures("down", "d1", "refused") == 1
    assert failures("down", "d2", "refused") == 1
    assert rejected("down", "connect_failed") == 1
    assert rejected("full", "max_connections_per_client") == 1
    assert scrape.value("tcpproxy_connections_total", listener="full", backend="v1") == 1
    for listener in ("retry", "none", "full", "down"):
        others = {
            "no_backend",
            "max_connections",
            "connect_failed",
            "max_connections_per_client",
        } - {
            "none": {"no_backend"},
            "full": {"max_connections_per_client"},
            "down": {"connect_failed"},
        }.get(listener, set())
        for reason in others:
            assert rejected(listener, reason) == 0
    assert_contract(scrape)


def test_gauges_follow_weights_draining_and_reload_results(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 1, 1, drain_timeout="300s"))
    admin = admins(running.proxy)

    def gauge(name: str, backend: str) -> float | None:
        return admin.metric(name, listener="app", backend=backend)

    started_at = admin.metric("tcpproxy_config_last_reload_success_timestamp_seconds")
    running.write_config(two_backends(port, v1, v2, 5, 0, drain_timeout="300s"))
    assert admin.post("/-/reload").status == 200
    assert gauge("tcpproxy_backend_weight", "v1") == 5
    assert gauge("tcpproxy_backend_weight", "v2") == 0
    assert gauge("tcpproxy_backend_draining", "v2") == 0  # weight 0 is not draining
    reloaded_at = running.state(lambda p: p.loaded_at)
    assert reloaded_at is not None
    assert started_at is not None
    assert reloaded_at >= started_at
    assert admin.metric("tcpproxy_config_last_reload_success_timestamp_seconds") == reloaded_at

    # A bad file: counted, flagged, and the timestamp of the last success stays.
    running.write_config("listeners: [")
    assert admin.post("/-/reload").status == 400
    scrape = admin.scrape()
    assert scrape.value("tcpproxy_config_reloads_total", result="failure") == 1
    assert scrape.value("tcpproxy_config_reloads_total", result="success") == 2
    assert scrape.value("tcpproxy_config_last_reload_successful") == 0
    assert scrape.value("tcpproxy_config_last_reload_success_timestamp_seconds") == reloaded_at
    assert scrape.value("tcpproxy_backend_weight", listener="app", backend="v1") == 5

    with clients(port, 2) as held:
        assert [c.greeting() for c in held] == ["v1", "v1"]
        running.write_config(
            config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="300s"))
        )
        assert admin.post("/-/reload").status == 200
        scrape = admin.scrape()
        assert scrape.value("tcpproxy_backend_draining", listener="app", backend="v1") == 1
        assert scrape.value("tcpproxy_backend_weight", listener="app", backend="v1") == 0
        assert scrape.value("tcpproxy_connections_active", listener="app", backend="v1") == 2
        assert scrape.value("tcpproxy_backend_draining", listener="app", backend="v2") == 0
        assert scrape.value("tcpproxy_backend_weight", listener="app", backend="v2") == 1
        assert scrape.value("tcpproxy_config_reloads_total", result="success") == 3
        assert scrape.value("tcpproxy_config_last_reload_successful") == 1
        assert scrape.value("tcpproxy_config_last_reload_success_timestamp_seconds") == (
            running.state(lambda p: p.loaded_at)
        )
        # Put back before its deadline: active again.
        running.write_config(two_backends(port, v1, v2, 2, 1, drain_timeout="300s"))
        assert admin.post("/-/reload").status == 200
        assert gauge("tcpproxy_backend_draining", "v1") == 0
        assert gauge("tcpproxy_backend_weight", "v1") == 2
        assert gauge("tcpproxy_connections_active", "v1") == 2


def test_series_of_a_drained_away_backend_disappear(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    """Linger 0 (the harness default): the series go as soon as the last connection closes."""
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 1, 1, drain_timeout="300s"))
    admin = admins(running.proxy)
    with clients(port, 4) as held:
        assert sorted(c.greeting() for c in held) == ["v1", "v1", "v2", "v2"]
        running.write_config(
            config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="300s"))
        )
        assert admin.post("/-/reload").status == 200
        scrape = admin.scrape()
        assert scrape.value("tcpproxy_backend_draining", listener="app", backend="v1") == 1
        assert scrape.value("tcpproxy_connections_active", listener="app", backend="v1") == 2
    idle(running)

    scrape = admin.scrape()
    assert scrape.series(backend="v1") == []
    for name in PER_BACKEND:
        assert scrape.value(name, listener="app", backend="v2") is not None
    assert scrape.value("tcpproxy_connection_duration_seconds_count", listener="app", backend="v2")
    assert_contract(scrape)


def test_drain_deadline_closes_are_counted_then_series_go_after_the_linger(
    backends: Backends,
    loop_thread: LoopThread,
    admins: StartAdmin,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The linger is measured on the metrics module's clock; move that clock, not the test.
    skew = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0])
    monkeypatch.setattr("tcpproxy.metrics.time", clock)
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(two_backends(port, v1, v2, 1, 0, drain_timeout="200ms"))
    running = RunningProxy(loop_thread, path, metrics_linger_s=600)
    try:
        admin = admins(running.proxy)
        with clients(port, 3) as held:
            assert [c.greeting() for c in held] == ["v1"] * 3
            running.write_config(
                config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="200ms"))
            )
            assert admin.post("/-/reload").status == 200
            for c in held:
                assert c.is_closed()
        idle(running)
        # Drained away, but reported for the linger so that the final counts are scraped.
        labels = {"listener": "app", "backend": "v1"}
        scrape = admin.scrape()
        assert scrape.value("tcpproxy_drain_closed_connections_total", **labels) == 3
        assert scrape.value("tcpproxy_connections_total", **labels) == 3
        assert scrape.value("tcpproxy_connections_active", **labels) == 0
        # The drain is over: a dashboard of draining backends must not count it any more.
        assert scrape.value("tcpproxy_backend_draining", **labels) == 0
        assert scrape.value("tcpproxy_connection_duration_seconds_count", **labels) == 3
        assert running.state(lambda p: [b.name for b in p.all_backends()]) == ["v2"]

        skew[0] = 601.0
        scrape = admin.scrape()
        assert scrape.series(backend="v1") == []
        assert scrape.value("tcpproxy_backend_weight", listener="app", backend="v2") == 1
        assert_contract(scrape)
    finally:
        running.shutdown()


def test_an_address_change_reports_one_series_per_backend_name(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    old, new = backends.start("v1"), backends.start("v1-new")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("app", port, {"v1": (old, 1)})))
    admin = admins(running.proxy)
    labels = {"listener": "app", "backend": "v1"}
    pinned = Client(port)
    try:
        assert pinned.greeting() == "v1"
        # Same name, new address: the old Backend drains beside the new one.
        running.write_config(config_yaml(listener_yaml("app", port, {"v1": (new, 4)})))
        assert admin.post("/-/reload").status == 200
        fresh = Client(port)
        assert fresh.greeting() == "v1-new"
        scrape = admin.scrape()  # asserts there are no duplicate samples
        assert scrape.value("tcpproxy_connections_active", **labels) == 2
        assert scrape.value("tcpproxy_connections_total", **labels) == 2
        assert scrape.value("tcpproxy_backend_weight", **labels) == 4
        assert scrape.value("tcpproxy_backend_draining", **labels) == 0
        fresh.close()
    finally:
        pinned.close()
    idle(running)
    # The old one drained away (linger 0) but the name lives on: its counters must not go
    # down, or Prometheus would read a counter reset.
    scrape = admin.scrape()
    assert scrape.value("tcpproxy_connections_total", **labels) == 2
    assert scrape.value("tcpproxy_bytes_total", direction="downstream", **labels) == (
        len("hello from v1\n") + len("hello from v1-new\n")
    )
    assert scrape.value("tcpproxy_connection_duration_seconds_count", **labels) == 2
    assert scrape.value("tcpproxy_connections_active", **labels) == 0
    # Once the name leaves the config and drains away, everything goes.
    running.write_config(config_yaml(listener_yaml("app", port, {"v2": (new, 1)})))
    assert admin.post("/-/reload").status == 200
    assert admin.scrape().series(backend="v1") == []


def test_backend_up_and_state_follow_health(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    v1 = backends.start("v1")
    dead = f"127.0.0.1:{free_port()}"
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "app",
                port,
                {"dead": (dead, 1), "v1": (v1, 1)},
                ejection="{consecutive_failures: 1, duration: 300s}",
            )
        )
    )
    admin = admins(running.proxy)
    assert admin.metric("tcpproxy_backend_up", listener="app", backend="dead") == 1
    for _ in range(3):  # the dead one is tried once, ejected, then skipped
        c = Client(port)
        assert c.greeting() == "v1"
        c.close()
    idle(running)
    scrape = admin.scrape()
    assert scrape.value("tcpproxy_backend_up", listener="app", backend="dead") == 0
    assert scrape.value("tcpproxy_backend_up", listener="app", backend="v1") == 1
    assert (
        scrape.value(
            "tcpproxy_backend_connect_failures_total",
            listener="app",
            backend="dead",
            reason="refused",
        )
        == 1
    )
    assert scrape.value("tcpproxy_backend_weight", listener="app", backend="dead") == 1
    status = admin.status()
    ejected = admin_http.backend_status(status, "app", "dead")
    assert (ejected["state"], ejected["ejected"], ejected["share"]) == ("unhealthy", True, 0.0)
    assert admin_http.backend_status(status, "app", "v1")["share"] == 1.0
    page = admin.get("/").text
    assert "unhealthy" in page
    assert "ejected" in page
