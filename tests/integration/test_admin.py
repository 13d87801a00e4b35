"""The admin HTTP server (DESIGN §5) over real HTTP: probes, /status, the page, reloads."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tcpproxy import __version__
from tcpproxy.admin import start_admin
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
from tests.integration.admin_http import Admin, backend_status

Start = Callable[[str], RunningProxy]
StartAdmin = Callable[[Proxy], Admin]
admins = pytest.fixture(admin_http.admins)


def two_backends(port: int, v1: str, v2: str, w1: int, w2: int, **options: object) -> str:
    return config_yaml(listener_yaml("app", port, {"v1": (v1, w1), "v2": (v2, w2)}, **options))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_probes_flip_across_start_up_and_shutdown(
    backends: Backends, loop_thread: LoopThread, admins: StartAdmin, tmp_path: Path
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("app", port, {"v1": (v1, 1)})))
    proxy = loop_thread.call(Proxy, path, 0.0)
    admin = admins(proxy)
    try:
        # Before the first config is applied: alive, not ready, nothing to show yet.
        assert admin.get("/livez").status == 200
        assert admin.get("/readyz").status == 503
        status = admin.status()
        assert status["ready"] is False
        assert status["sha256"] is None
        assert status["listeners"] == []
        assert admin.get("/").status == 200
        assert admin.metric("tcpproxy_build_info", version=__version__) == 1

        loop_thread.run(proxy.start())
        assert admin.get("/readyz").status == 200
        assert admin.status()["ready"] is True

        held = Client(port)
        try:
            assert held.greeting() == "v1"
            shutdown = asyncio.run_coroutine_threadsafe(proxy.shutdown(60), loop_thread.loop)
            # Shutting down: not ready at once, still alive, the listener closed, and the
            # live connection may finish.
            wait_until(lambda: admin.get("/readyz").status == 503, what="readyz 503")
            assert admin.get("/livez").status == 200
            assert admin.status()["ready"] is False
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assert held.echo(b"finishing\n") == b"finishing\n"
            assert not shutdown.done()
            reload = admin.post("/-/reload")
            assert reload.status == 200
            assert reload.json()["result"] == "unchanged"
        finally:
            held.close()
        shutdown.result(timeout=10)  # the last connection ended: shutdown completes
        assert admin.get("/readyz").status == 503
        assert admin.get("/livez").status == 200
    finally:
        loop_thread.run(proxy.shutdown(0))


def test_post_reload_applies_a_good_file_and_status_shows_it(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 1, 0))
    admin = admins(running.proxy)
    path = running.config_path

    status = admin.status()
    assert status["config_path"] == str(path)
    assert status["sha256"] == sha256(path)
    assert status["version"] == __version__
    assert status["ready"] is True
    assert status["last_reload"]["trigger"] == "startup"
    assert status["last_reload"]["result"] == "success"
    assert status["loaded_at"] == status["last_reload"]["at"]
    assert status["last_error"] == []
    [listener] = status["listeners"]
    assert listener["name"] == "app"
    assert listener["bind"] == f"127.0.0.1:{port}"
    assert listener["state"] == "serving"

    with clients(port, 2) as held:
        assert [c.greeting() for c in held] == ["v1", "v1"]
        assert held[0].echo(b"12345") == b"12345"
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0, what="closed")

    running.write_config(two_backends(port, v1, v2, 3, 1))
    response = admin.post("/-/reload")
    assert response.status == 200
    result = response.json()
    assert result["result"] == "success"
    assert result["trigger"] == "admin"
    assert result["sha256"] == sha256(path)
    assert result["problems"] == []
    assert "v1" in result["summary"]

    status = admin.status()
    assert status["sha256"] == sha256(path)
    assert status["loaded_at"] == result["at"]
    assert status["last_reload"] == result
    one, two = backend_status(status, "app", "v1"), backend_status(status, "app", "v2")
    assert (one["weight"], one["share"], one["state"]) == (3, 0.75, "active")
    assert (two["weight"], two["share"], two["state"]) == (1, 0.25, "active")
    assert one["address"] == v1
    assert (one["active_connections"], one["total_connections"]) == (0, 2)
    assert one["bytes_upstream"] == 5
    assert one["bytes_downstream"] == 2 * len("hello from v1\n") + 5
    assert one["connect_failures"] == {"refused": 0, "timeout": 0, "dns": 0, "other": 0}
    assert one["drain_deadline"] is None
    assert one["drain_seconds_left"] is None

    again = admin.post("/-/reload")
    assert again.status == 200
    assert again.json()["result"] == "unchanged"
    assert running.reload_count("success") == 2


def test_post_reload_with_a_bad_file_is_400_and_changes_nothing(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    good = two_backends(port, v1, v2, 1, 0)
    running = start_proxy(good)
    admin = admins(running.proxy)
    path = running.config_path
    before = admin.status()

    running.write_config(good.replace("weight: 0", "weight: -1"))
    response = admin.post("/-/reload")
    assert response.status == 400
    result = response.json()
    problem = f"{path}: listeners[0].backends[1].weight: Input should be greater than or equal to 0"
    assert result["result"] == "failure"
    assert result["problems"] == [problem]
    assert result["sha256"] == sha256(path)

    status = admin.status()
    assert status["sha256"] == before["sha256"]
    assert status["loaded_at"] == before["loaded_at"]
    assert status["listeners"] == before["listeners"]
    assert status["last_reload"] == result
    assert status["last_error"] == [problem]
    assert admin.metric("tcpproxy_config_reloads_total", result="failure") == 1
    assert admin.metric("tcpproxy_config_last_reload_successful") == 0
    c = Client(port)
    assert c.greeting() == "v1"  # the old weights keep serving
    c.close()

    path.unlink()
    missing = admin.post("/-/reload")
    assert missing.status == 400
    assert missing.json()["problems"] == [f"{path}: file not found"]

    running.write_config(two_backends(port, v1, v2, 0, 1))
    fixed = admin.post("/-/reload")
    assert fixed.status == 200
    assert fixed.json()["result"] == "success"
    status = admin.status()
    assert status["last_error"] == []
    assert backend_status(status, "app", "v2")["share"] == 1.0
    assert admin.metric("tcpproxy_config_last_reload_successful") == 1


def test_status_during_a_drain(backends: Backends, start_proxy: Start, admins: StartAdmin) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 1, 0, drain_timeout="300s"))
    admin = admins(running.proxy)
    with clients(port, 2) as held:
        assert [c.greeting() for c in held] == ["v1", "v1"]
        running.write_config(
            config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="300s"))
        )
        assert admin.post("/-/reload").status == 200
        before = time.time()
        status = admin.status()
        after = time.time()
        draining = backend_status(status, "app", "v1")
        assert draining["state"] == "draining"
        assert draining["share"] == 0.0
        assert draining["active_connections"] == 2
        left = draining["drain_seconds_left"]
        assert 0 < left <= 300
        assert left == round(left, 1), "seconds left to a tenth, not 58.679999999999836"
        # The wall-clock deadline and the seconds left tell the same story: the deadline less
        # the seconds left is when /status answered.
        answered_at = draining["drain_deadline"] - left
        assert before - 0.001 <= answered_at <= after + 0.001
        active = backend_status(status, "app", "v2")
        assert (active["state"], active["share"]) == ("active", 1.0)
        assert status["listeners"][0]["open_connections"] == 2

        page = admin.get("/")
        assert "draining" in page.text
        assert "data-left=" in page.text

        for c in held:  # still served while draining
            assert c.echo(b"draining\n") == b"draining\n"
    # Drained away: the backend leaves the status.
    wait_until(
        lambda: [b["name"] for b in admin.status()["listeners"][0]["backends"]] == ["v2"],
        what="v1 gone from /status",
    )


def test_removed_listener_shows_as_removed_while_it_drains(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    v1 = backends.start("v1")
    port, other = free_port(), free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml("old", port, {"v1": (v1, 1)}, drain_timeout="300s"),
            listener_yaml("new", other, {"v1": (v1, 1)}),
        )
    )
    admin = admins(running.proxy)
    held = Client(port)
    try:
        assert held.greeting() == "v1"
        running.write_config(config_yaml(listener_yaml("new", other, {"v1": (v1, 1)})))
        assert admin.post("/-/reload").status == 200
        by_name = {lst["name"]: lst for lst in admin.status()["listeners"]}
        assert by_name["old"]["state"] == "removed"
        assert by_name["old"]["backends"][0]["state"] == "draining"
        assert by_name["new"]["state"] == "serving"
        assert "removed from the config: the port is closed" in admin.get("/").text
    finally:
        held.close()
    wait_until(
        lambda: [lst["name"] for lst in admin.status()["listeners"]] == ["new"],
        what="removed listener gone",
    )


def test_page_renders_everything_escaped_and_self_contained(
    backends: Backends, loop_thread: LoopThread, admins: StartAdmin, tmp_path: Path
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    # A hostile-looking directory name must come out as text, not markup.
    directory = tmp_path / "<b>cfg&"
    directory.mkdir()
    path = directory / "tcpproxy.yaml"
    path.write_text(two_backends(port, v1, v2, 80, 20))
    running = RunningProxy(loop_thread, path)
    try:
        admin = admins(running.proxy)
        page = admin.get("/")
        assert page.status == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert page.headers["Cache-Control"] == "no-store"
        text = page.text
        assert "&lt;b&gt;cfg&amp;" in text
        assert "<b>cfg&" not in text
        assert sha256(path)[:12] in text
        for expected in ("app", f"127.0.0.1:{port}", "v1", "v2", v1, v2, "80%", "20%"):
            assert expected in text
        assert "<script>" in text  # refreshes itself
        # No external assets: the admin port may have no internet.
        assert "http://" not in text
        assert "https://" not in text
        assert " src=" not in text
    finally:
        running.shutdown()


def test_metrics_endpoint_speaks_prometheus_text_and_gzip(
    start_proxy: Start, backends: Backends, admins: StartAdmin
) -> None:
    v1 = backends.start("v1")
    running = start_proxy(config_yaml(listener_yaml("app", free_port(), {"v1": (v1, 1)})))
    admin = admins(running.proxy)
    plain = admin.get("/metrics")
    assert plain.status == 200
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert "tcpproxy_connections_total" in plain.text
    zipped = admin.request("/metrics", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers.get("Content-Encoding") == "gzip"


def test_admin_address_in_use_raises(loop_thread: LoopThread, tmp_path: Path) -> None:
    proxy = loop_thread.call(Proxy, tmp_path / "tcpproxy.yaml", 0.0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        with pytest.raises(OSError, match=r"(?i)address already in use"):
            loop_thread.run(start_admin(proxy, f"{host}:{port}"))
