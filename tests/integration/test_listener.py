"""Listener behaviour over real sockets: weights, retries, limits, timeouts."""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from tests.harness import (
    WAIT_S,
    Backends,
    Client,
    RunningProxy,
    clients,
    config_yaml,
    free_port,
    greetings,
    listener_yaml,
    proxy_accept_queue,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")


def test_weights_80_20_give_exactly_800_200_of_1000(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 80), "v2": (v2, 20)})))
    assert greetings(port, 1000) == {"v1": 800, "v2": 200}


def test_weight_zero_gets_nothing(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 0), "v2": (v2, 3)})))
    assert greetings(port, 30) == {"v2": 30}


def test_refusing_backend_is_retried_on_the_other_and_counted(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"dead": (dead, 50), "v1": (v1, 50)}))
    )
    assert greetings(port, 40) == {"v1": 40}
    failures = running.backend_stat("w", "dead", "connect_failures")
    # Every second pick went to it first, until 5 failures in a row ejected it (the default).
    assert failures["refused"] == 5
    assert running.backend_stat("w", "dead", "state") == "unhealthy"
    assert running.metric("tcpproxy_backend_up", listener="w", backend="dead") == 0
    assert running.backend_stat("w", "v1", "total") == 40


def test_all_backends_refusing_closes_the_client_and_counts(
    start_proxy: Callable[[str], RunningProxy],
) -> None:
    port = free_port()
    dead = {f"d{i}": (f"127.0.0.1:{free_port()}", 1) for i in range(4)}
    running = start_proxy(config_yaml(listener_yaml("w", port, dead)))
    client = Client(port)
    assert client.is_closed()
    client.close()
    total = sum(running.backend_stat("w", name, "connect_failures")["refused"] for name in dead)
    assert total == 3  # up to 3 attempts, never the same backend twice
    rejected = running.metric(
        "tcpproxy_connections_rejected_total", listener="w", reason="connect_failed"
    )
    assert rejected == 1


def test_no_eligible_backend_accepts_and_closes(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 0)})))
    client = Client(port)
    assert client.is_closed()
    client.close()
    rejected = running.metric(
        "tcpproxy_connections_rejected_total", listener="w", reason="no_backend"
    )
    assert rejected == 1


def test_max_connections_leaves_the_extra_one_waiting_until_a_slot_frees(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w", port, {"v1": (v1, 1)}, max_connections=3, max_connections_per_client=0
            )
        )
    )
    with clients(port, 3) as held:
        assert [c.greeting() for c in held] == ["v1"] * 3
        # Not accepted, not closed: it waits in the kernel's listen queue.
        extra = Client(port)
        wait_until(lambda: proxy_accept_queue(running, "w") == 1, what="extra one queued")
        assert running.state(lambda p: p.open_connections) == 3
        # The held ones still work.
        assert held[0].echo(b"still here\n") == b"still here\n"
        held[0].close()
        # A slot freed: the waiting client is taken from the queue and served.
        assert extra.greeting() == "v1"
        assert extra.echo(b"in\n") == b"in\n"
        extra.close()
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert greetings(port, 1) == {"v1": 1}
    rejected = running.metric(
        "tcpproxy_connections_rejected_total", listener="w", reason="max_connections"
    )
    assert rejected == 0


@pytest.fixture
def unresponsive_backend() -> Iterator[str]:
    """A listening socket whose accept queue is full: further SYNs are dropped, so connecting
    to it hangs until the connect timeout (loopback never refuses or answers)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        fillers.append(s)
    yield f"127.0.0.1:{address[1]}"
    for s in fillers:
        s.close()
    server.close()


def test_connect_timeout_counts_and_falls_back(
    backends: Backends, start_proxy: Callable[[str], RunningProxy], unresponsive_backend: str
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w",
                port,
                {"slow": (unresponsive_backend, 1), "v1": (v1, 1)},
                # The same timeout holds for v1's connects: long enough that a loaded machine
                # never trips it on loopback, as the unresponsive backend always does.
                connect_timeout="2s",
            )
        )
    )
    assert greetings(port, 2) == {"v1": 2}
    assert running.backend_stat("w", "slow", "connect_failures")["timeout"] == 1


def test_client_leaving_before_backend_connects_is_cleaned_up(
    start_proxy: Callable[[str], RunningProxy], unresponsive_backend: str
) -> None:
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml("w", port, {"slow": (unresponsive_backend, 1)}, connect_timeout="30s")
        )
    )
    client = Client(port)
    client.sock.sendall(b"early bytes")
    wait_until(lambda: running.state(lambda p: p.open_connections) == 1)
    # Leave abortively. (A plain FIN is a half-close: the proxy must keep connecting and
    # deliver what was sent, as the echo tests check.)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    # Long before the 30 s connect timeout, the pending connect is abandoned.
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert running.backend_stat("w", "slow", "connect_failures")["timeout"] == 0


def test_idle_timeout_closes_silent_connections_only(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    # The chatty connection pings every few ms: 1 s of silence is far beyond any pause a
    # loaded machine puts between two pings.
    running = start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, idle_timeout="1s")))
    silent, chatty = Client(port), Client(port)
    assert silent.greeting() == chatty.greeting() == "v1"
    deadline = time.monotonic() + WAIT_S
    while not silent.is_closed(timeout=0.02):
        assert time.monotonic() < deadline, "the silent connection was never closed"
        assert chatty.echo(b"ping\n") == b"ping\n"
    assert chatty.echo(b"ping\n") == b"ping\n"
    silent.close()
    chatty.close()
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)

    def ends(reason: str) -> float | None:
        return running.metric(
            "tcpproxy_connections_closed_total", listener="w", backend="v1", reason=reason
        )

    assert ends("idle_timeout") == 1
    assert ends("client_closed") == 1


def test_backend_given_by_host_name_is_resolved_at_connect_time(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    by_name = v1.replace("127.0.0.1", "localhost")
    running = start_proxy(config_yaml(listener_yaml("w", port, {"v1": (by_name, 1)})))
    assert greetings(port, 3) == {"v1": 3}
    assert running.backend_stat("w", "v1", "literal") is False


def test_clients_resetting_at_once_leave_nothing_behind(
    backends: Backends,
    start_proxy: Callable[[str], RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (found by the soak): a client that resets before the proxy looks at it
    made the splice engine's accept callback raise, leaking the connection."""
    caplog.set_level(logging.INFO, logger="tcpproxy.access")  # the access log reads peers
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)})))
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    assert greetings(port, 3) == {"v1": 3}
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0, what="all closed")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
