"""Listing and ending live connections through the admin API, over real sockets: what
GET /connections shows, its filters and pages, DELETE of one connection or of a backend's,
how those ends are counted, and that only a guarded request can end anything."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pytest

from tcpproxy import cli
from tcpproxy.admin import AdminOptions
from tests.harness import (
    Backends,
    Client,
    RawBackend,
    RunningProxy,
    clients,
    config_yaml,
    free_port,
    listener_yaml,
    read_to_end,
    wait_until,
)
from tests.integration import admin_http
from tests.integration.admin_http import Admin, StartAdmin

Start = Callable[[str], RunningProxy]
admins = pytest.fixture(admin_http.admins)
TOKEN = "a-test-admin-token-of-some-length"


def routes(port: int, v1: str, v2: str, with_v2: bool = True) -> str:
    backends = {"v1": (v1, 1), "v2": (v2, 1)} if with_v2 else {"v1": (v1, 1)}
    return config_yaml(listener_yaml("app", port, backends, drain_timeout="300s"))


def listed(admin: Admin, query: str = "") -> Any:
    response = admin.get("/connections" + query)
    assert response.status == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    return response.json()


def by_backend(admin: Admin) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for conn in listed(admin)["connections"]:
        out.setdefault(conn["backend"], []).append(conn["id"])
    return out


def test_list_filter_and_page(backends: Backends, start_proxy: Start, admins: StartAdmin) -> None:
    port = free_port()
    v1, v2 = backends.start("v1"), backends.start("v2")
    running = start_proxy(routes(port, v1, v2))
    admin = admins(running.proxy)
    with clients(port, 4) as held:
        names = [c.greeting() for c in held]
        assert sorted(names) == ["v1", "v1", "v2", "v2"]
        assert held[0].echo(b"x" * 1000) == b"x" * 1000
        page = listed(admin)
        conns = page["connections"]
        assert page["next"] is None
        assert [c["id"] for c in conns] == sorted(c["id"] for c in conns)
        assert len(set(c["id"] for c in conns)) == 4
        # In id order, which is the order they were opened in: each one's client is the
        # address of the socket that opened it.
        for client, conn in zip(held, conns, strict=True):
            host, cport = client.sock.getsockname()
            assert conn["client"] == f"{host}:{cport}"
            assert conn["listener"] == "app"
            assert conn["state"] == "established"
            assert conn["draining"] is False
            assert conn["age_s"] >= 0
        first = conns[0]
        assert first["backend"] == names[0]
        assert first["backend_address"] == {"v1": v1, "v2": v2}[names[0]]
        assert first["bytes_upstream"] == 1000
        assert first["bytes_downstream"] == len(f"hello from {names[0]}\n") + 1000

        assert len(listed(admin, "?backend=v1")["connections"]) == 2
        assert len(listed(admin, "?listener=app&state=established")["connections"]) == 4
        assert listed(admin, "?listener=other")["connections"] == []
        assert listed(admin, "?older_than=1h")["connections"] == []
        assert listed(admin, "?state=draining")["connections"] == []

        # Pages of one, following `next`: every connection once, in id order.
        seen, path = [], "/connections?limit=1"
        while path is not None:
            page = admin.get(path).json()
            assert len(page["connections"]) == 1
            seen.append(page["connections"][0]["id"])
            path = page["next"]
        assert seen == [c["id"] for c in conns]

        # v2 leaves the config: its two connections live on, draining.
        running.write_config(routes(port, v1, v2, with_v2=False))
        assert running.reload().result == "success"
        draining = listed(admin, "?state=draining")["connections"]
        assert sorted(c["backend"] for c in draining) == ["v2", "v2"]
        assert all(c["draining"] for c in draining)
        held[-1].sock.shutdown(2)  # SHUT_RDWR
        wait_until(lambda: len(listed(admin)["connections"]) == 3, what="a client gone")


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("?older_than=soon", "older_than: invalid duration 'soon'"),
        ("?limit=0", "limit: '0' is not a whole number from 1 to 1000"),
        ("?limit=1001", "limit: '1001' is not a whole number from 1 to 1000"),
        ("?after=-1", "after: '-1' is not a whole number >= 0"),
        ("?state=open", "state: 'open' is not one of awaiting_header, connecting"),
        ("?backends=v1", "unknown parameter 'backends'"),
    ],
)
def test_a_bad_query_is_one_line(
    start_proxy: Start, admins: StartAdmin, backends: Backends, query: str, says: str
) -> None:
    running = start_proxy(routes(free_port(), backends.start("v1"), backends.start("v2")))
    response = admins(running.proxy).get("/connections" + query)
    assert response.status == 400
    assert response.json()["error"].startswith(says)


def test_close_one_then_a_backend(
    backends: Backends, start_proxy: Start, admins: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tcpproxy.access")  # before the listener reads it
    port = free_port()
    running = start_proxy(routes(port, backends.start("v1"), backends.start("v2")))
    admin = admins(running.proxy)
    with clients(port, 6) as held:
        by_name: dict[str, list[Client]] = {}
        for client in held:
            by_name.setdefault(client.greeting(), []).append(client)
        ids = by_backend(admin)
        assert len(ids["v1"]) == len(ids["v2"]) == 3

        # One connection, idle with nothing held: a clean FIN to its client.
        victim = ids["v1"][0]
        response = admin.request(f"/connections/{victim}", "DELETE")
        assert response.status == 200, response.text
        assert response.json()["closing"] == 1
        assert [c["id"] for c in response.json()["connections"]] == [victim]
        first = by_name["v1"][0]
        first.sock.settimeout(10)
        assert first.sock.recv(1) == b""
        assert admin.request(f"/connections/{victim}", "DELETE").status == 404

        # The rest of v1's: "drain now". v2's connections are untouched.
        response = admin.request("/connections?backend=v1", "DELETE")
        assert response.status == 200, response.text
        assert response.json() == {"closing": 2, "listener": "app", "backend": "v1"}
        for client in by_name["v1"][1:]:
            assert client.is_closed()
        wait_until(lambda: "v1" not in by_backend(admin), what="v1's connections gone")
        for client in by_name["v2"]:
            assert client.echo(b"still here\n") == b"still here\n"
        assert len(by_backend(admin)["v2"]) == 3

    closed = running.metric(
        "tcpproxy_connections_closed_total", listener="app", backend="v1", reason="admin_closed"
    )
    assert closed == 3
    ends = [getattr(r, "end", None) for r in caplog.records if r.name == "tcpproxy.access"]
    assert ends.count("admin_closed") == 3


def test_closing_needs_a_backend_that_exists(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    running = start_proxy(routes(free_port(), backends.start("v1"), backends.start("v2")))
    admin = admins(running.proxy)
    response = admin.request("/connections", "DELETE")
    assert response.status == 400
    assert response.json()["error"].startswith("backend: required")
    response = admin.request("/connections?backend=v3", "DELETE")
    assert response.status == 404
    assert response.json()["error"] == "no backend 'v3'"
    assert admin.request("/connections/12345678", "DELETE").status == 404


def test_closing_is_guarded_like_every_control_endpoint(
    backends: Backends, start_proxy: Start, admins: StartAdmin
) -> None:
    port = free_port()
    running = start_proxy(routes(port, backends.start("v1"), backends.start("v2")))
    admin = admins(running.proxy, AdminOptions(token=TOKEN))
    with clients(port, 2) as held:
        for client in held:
            client.greeting()
        # Reading needs no token.
        [conn, _] = listed(admin)["connections"]
        path = f"/connections/{conn['id']}"
        assert admin.request(path, "DELETE", token=False).status == 401
        foreign = {"Origin": "http://evil.example"}
        assert admin.request(path, "DELETE", headers=foreign).status == 403
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert admin.request("/connections?backend=v1", "DELETE", headers=form).status == 415
        assert len(listed(admin)["connections"]) == 2
        assert admin.request(path, "DELETE").status == 200
        wait_until(lambda: len(listed(admin)["connections"]) == 1, what="one closed")


def test_the_connections_command(
    backends: Backends,
    start_proxy: Start,
    admins: StartAdmin,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`tcpproxy connections` lists as a table and closes with the token from the
    environment, as users run it (in this process: the proxy is on its loop thread)."""
    port = free_port()
    running = start_proxy(routes(port, backends.start("v1"), backends.start("v2")))
    admin = admins(running.proxy, AdminOptions(token=TOKEN))
    flags = ["--admin", admin.address]
    with clients(port, 4) as held:
        for client in held:
            client.greeting()
        assert cli.main(["connections", *flags]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == [
            "ID",
            "LISTENER",
            "BACKEND",
            "CLIENT",
            "STATE",
            "AGE",
            "UP",
            "DOWN",
        ]
        assert out[-1] == "4 open connections"
        rows = [line.split() for line in out[1:-1]]
        assert sorted(row[2] for row in rows) == ["v1", "v1", "v2", "v2"]
        assert {row[4] for row in rows} == {"established"}
        assert rows[0][6:] == ["0B", "14B"]  # nothing sent; "hello from v1\n" received

        assert cli.main(["connections", "--backend", "v2", *flags]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "2 open connections"

        # Closing needs the token: without it, refused and nothing closes.
        assert cli.main(["connections", "close", rows[0][0], *flags]) == 2
        assert "admin token" in capsys.readouterr().err
        monkeypatch.setenv("TCPPROXY_ADMIN_TOKEN", TOKEN)
        assert cli.main(["connections", "close", rows[0][0], *flags]) == 0
        assert capsys.readouterr().out == f"closing connection {rows[0][0]}\n"
        assert cli.main(["connections", "close", rows[0][0], *flags]) == 1
        assert f"no open connection {rows[0][0]}" in capsys.readouterr().err
        assert cli.main(["connections", "close", "--backend", "v2", *flags]) == 0
        assert capsys.readouterr().out == "closing 2 connections of app/v2\n"
        assert cli.main(["connections", "close", *flags]) == 2
        assert "give a connection ID or --backend" in capsys.readouterr().err
        wait_until(lambda: len(listed(admin)["connections"]) == 1, what="three closed")

    assert cli.main(["connections", "--admin", f"127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the admin server" in capsys.readouterr().err


def test_closing_a_connection_with_bytes_in_flight_is_a_reset(
    start_proxy: Start, admins: StartAdmin
) -> None:
    """The backend has sent more than the client has read: the proxy holds some of it, so
    ending the connection must not look like a complete stream to either side."""
    backend = RawBackend()
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("app", port, {"v1": (backend.address, 1)})))
    admin = admins(running.proxy)
    client = Client(port)
    upstream = backend.accept()
    try:
        upstream.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # until every buffer on the way is full
                upstream.send(b"x" * 65536)
        upstream.settimeout(10)  # blocking again, bounded
        [conn] = listed(admin)["connections"]
        assert admin.request(f"/connections/{conn['id']}", "DELETE").status == 200
        assert read_to_end(client.sock)[1] == "reset"
        assert read_to_end(upstream)[1] == "reset"
    finally:
        client.close()
        upstream.close()
        backend.close()
