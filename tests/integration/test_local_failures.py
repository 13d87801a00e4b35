"""Failures of this host are not the backend's: out of local source ports (EADDRNOTAVAIL,
EADDRINUSE) is injected at the socket edge, where connect() reports it, and must eject no
backend, abort no rollout and fail no health check. (tests/e2e/test_limits.py runs out of
ports for real, in a network namespace with 50 of them.)"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tcpproxy import relay
from tcpproxy.pool import ROLLOUT_TICK_MAX_S
from tests.harness import (
    Backends,
    Client,
    RunningProxy,
    config_yaml,
    free_port,
    listener_yaml,
    sleep_until,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")

Start = Callable[[str], RunningProxy]


class PortShortage:
    """socket.connect_ex fails with `errno_` for the backend ports in `ports` (the kernel's
    answer when no local port is left for that destination), for every socket the proxy
    opens; other connects are untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, errno_: int = errno.EADDRNOTAVAIL) -> None:
        self.ports: set[int] = set()
        self.errno = errno_
        self.failed = 0
        real = socket.socket.connect_ex

        def connect_ex(sock: socket.socket, address: Any) -> int:
            if isinstance(address, tuple) and address[1] in self.ports:
                self.failed += 1
                return self.errno
            return real(sock, address)

        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        # The proxy makes its sockets with the C type, whose methods cannot be replaced:
        # have it make Python ones, of the class patched above.
        monkeypatch.setattr(relay, "Socket", socket.socket)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def after_a_rollout_tick(running: RunningProxy) -> None:
    """Return once a rollout tick has run after this call began (one runs at least every
    ROLLOUT_TICK_MAX_S of the proxy's loop clock)."""

    async def barrier() -> None:
        await sleep_until(asyncio.get_running_loop().time() + ROLLOUT_TICK_MAX_S + 0.05)

    running.thread.run(barrier())


@pytest.mark.parametrize("errno_", [errno.EADDRNOTAVAIL, errno.EADDRINUSE])
def test_out_of_source_ports_ejects_nothing_and_aborts_no_rollout(
    backends: Backends,
    start_proxy: Start,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    errno_: int,
) -> None:
    """The report: with 50 local ports, both backends were ejected and the rollout aborted
    for good ("20 of 70 connection attempts to the new backend failed"), logged as
    `failed: other`."""
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    block = "    rollout: {from: v1, to: v2, steps: [50], step_duration: 1h}\n"
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"v1": (v1, 1), "v2": (v2, 0)}) + block)
    )
    shortage = PortShortage(monkeypatch, errno_)
    shortage.ports = {port_of(v1), port_of(v2)}
    # Far more than ejection's 5 failures in a row, and the rollout's 5 attempts.
    for _ in range(20):
        client = Client(port)
        assert client.is_closed()  # nothing to connect it to, for now
        client.close()
    assert shortage.failed >= 20
    after_a_rollout_tick(running)
    for name in ("v1", "v2"):
        assert running.backend_stat("w", name, "connect_failures") == {
            "refused": 0,
            "timeout": 0,
            "dns": 0,
            "other": 0,
        }
        assert running.backend_stat("w", name, "ejected") is False
        assert running.metric("tcpproxy_backend_up", listener="w", backend=name) == 1
    rollout = running.state(lambda p: p.listeners["w"].rollout)
    assert rollout is not None
    assert running.state(lambda _: rollout.state) == "running"
    assert (
        running.metric("tcpproxy_connections_rejected_total", listener="w", reason="connect_failed")
        == 20
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "tcpproxy"]
    assert not [line for line in lines if "failed: other" in line]
    shortage_lines = [line for line in lines if "out of local ports" in line]
    # Its strerror, once (not once per connection).
    assert len(shortage_lines) == 1, lines
    assert os.strerror(errno_) in shortage_lines[0]
    # Ports free again: both backends serve at once, nothing to wait out.
    shortage.ports = set()
    seen = set()
    for _ in range(4):
        client = Client(port)
        seen.add(client.greeting())
        client.close()
    assert seen == {"v1", "v2"}


def test_a_backend_out_of_ports_hands_its_clients_to_another(
    backends: Backends, start_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local ports run out per destination address: another backend has its own."""
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 1), "v2": (v2, 1)})))
    shortage = PortShortage(monkeypatch)
    shortage.ports = {port_of(v1)}
    for _ in range(10):
        client = Client(port)
        assert client.greeting() == "v2"
        client.close()
    assert shortage.failed >= 1  # some picked v1 first (how many is the balancer's affair)
    assert running.backend_stat("w", "v1", "state") == "active"
    assert sum(running.backend_stat("w", "v1", "connect_failures").values()) == 0


def test_a_health_check_that_cannot_get_a_local_port_fails_no_backend(
    backends: Backends, start_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    checks: list[str] = []

    async def no_port(host: str, port: int) -> Any:
        checks.append(host)
        raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    # Where health checks connect (asyncio's, for the whole process during this test).
    monkeypatch.setattr(asyncio, "open_connection", no_port)
    check = "    health_check: {interval: 10ms, timeout: 1s, unhealthy_threshold: 1}\n"
    running = start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}) + check))
    # Far more checks than the one failure that would mark it down.
    wait_until(lambda: len(checks) >= 10, what="ten health checks")
    assert running.backend_stat("w", "v1", "healthy") is True
    client = Client(port)
    assert client.greeting() == "v1"
    client.close()


def test_local_shortages_log_their_own_advice(
    backends: Backends,
    start_proxy: Start,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="tcpproxy")
    v1 = backends.start("v1")
    port = free_port()
    start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)})))
    shortage = PortShortage(monkeypatch, errno.EMFILE)
    shortage.ports = {port_of(v1)}
    client = Client(port)
    assert client.is_closed()
    client.close()
    shortage.errno = errno.EADDRNOTAVAIL
    client = Client(port)
    assert client.is_closed()
    client.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    # Two kinds of shortage, two lines (each kind is rate-limited on its own).
    assert len(lines) == 2, lines
    assert "raise the open files limit" in lines[0]
    assert "Too many open files" in lines[0]
    assert "net.ipv4.ip_local_port_range" in lines[1]
    assert "Cannot assign requested address" in lines[1]
