"""A connection belongs to its backend from the moment the backend is picked: while it is still
connecting, removing the backend or its whole listener, the drain deadline, shutdown, /status
and the metrics all see it. Over real loopback sockets."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tcpproxy.admin import status
from tests.harness import (
    WAIT_S,
    Backends,
    Client,
    RunningProxy,
    config_yaml,
    free_port,
    listener_yaml,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")

Start = Callable[[str], RunningProxy]
# Long enough never to end a connection during a test: what ends it must be the thing tested.
NEVER = "60s"


class FullBackend:
    """A listening socket that never accepts, with a backlog of 0: its accept queue holds one
    connection, and once that is there every further SYN is dropped (and retried by the kernel
    into the same full queue), so a connect to it stays in progress."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        host, port = self.server.getsockname()
        self.address = f"{host}:{port}"
        self.fillers: list[socket.socket] = []

    def fill(self) -> None:
        """Take the queue's one place ourselves: the proxy's connects then all hang."""
        self.fillers.append(socket.create_connection(self.server.getsockname(), timeout=WAIT_S))

    def refuse(self) -> None:
        """Stop listening: the next SYN the kernel retries is refused."""
        self.server.close()

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.server.close()


@pytest.fixture
def full_backend() -> Iterator[FullBackend]:
    backend = FullBackend()
    yield backend
    backend.close()


@pytest.fixture
def connect() -> Iterator[Callable[[int], Client]]:
    """Open clients, each closed after the test (even one that failed half-way)."""
    opened: list[Client] = []

    def open_client(port: int) -> Client:
        opened.append(Client(port))
        return opened[-1]

    yield open_client
    for client in opened:
        client.close()


@pytest.fixture
def access_ends(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The `end` of every access log line so far. (A listener reads once, when it is made,
    whether the access log is on: this fixture must come before the proxy starts.)"""
    caplog.set_level(logging.INFO, logger="tcpproxy.access")

    def ends() -> list[str]:
        return [r.__dict__["end"] for r in caplog.records if r.name == "tcpproxy.access"]

    return ends


def backend_status(running: RunningProxy, listener: str, backend: str) -> dict[str, Any] | None:
    """The backend as /status shows it, or None when /status does not list it."""
    for lst in running.state(status)["listeners"]:
        if lst["name"] == listener:
            for b in lst["backends"]:
                if b["name"] == backend:
                    found: dict[str, Any] = b
                    return found
    return None


def await_connecting(running: RunningProxy, listener: str, backend: str, n: int) -> None:
    """Wait for `n` open connections of which none reached `backend` yet (the precondition
    of every test here: the connect is still in progress when the test acts)."""
    wait_until(lambda: running.state(lambda p: p.open_connections) == n, what=f"{n} accepted")
    assert running.backend_stat(listener, backend, "total") == 0, (
        "a connect to the full backend completed: this kernel did not drop the SYN"
    )


def test_a_backend_removed_while_connecting_keeps_its_connection(
    backends: Backends,
    start_proxy: Start,
    connect: Callable[[int], Client],
    full_backend: FullBackend,
) -> None:
    full_backend.fill()
    v1 = backends.start("v1")
    port = free_port()
    opts = {"connect_timeout": NEVER, "drain_timeout": NEVER}
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"slow": (full_backend.address, 1)}, **opts))
    )
    client = connect(port)
    await_connecting(running, "w", "slow", 1)

    running.write_config(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, **opts)))
    assert running.reload().result == "success"

    slow = backend_status(running, "w", "slow")
    assert slow is not None, "the removed backend was forgotten while its connection connected"
    assert (slow["state"], slow["active_connections"]) == ("draining", 1)
    active = running.metric("tcpproxy_connections_active", listener="w", backend="slow")
    assert active == 1
    running.shutdown(0)
    assert client.is_closed()


def test_a_connection_still_connecting_is_closed_at_its_backends_drain_deadline(
    backends: Backends,
    start_proxy: Start,
    connect: Callable[[int], Client],
    full_backend: FullBackend,
    access_ends: Callable[[], list[str]],
) -> None:
    full_backend.fill()
    v1 = backends.start("v1")
    port = free_port()
    opts = {"connect_timeout": NEVER, "drain_timeout": "200ms"}
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"slow": (full_backend.address, 1)}, **opts))
    )
    client = connect(port)
    await_connecting(running, "w", "slow", 1)

    running.write_config(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, **opts)))
    assert running.reload().result == "success"

    assert client.is_closed(), "the drain deadline did not close the connection"
    wait_until(lambda: access_ends() == ["drain_deadline"], what="its access log line")
    wait_until(lambda: backend_status(running, "w", "slow") is None, what="slow forgotten")


def test_the_drain_deadline_closes_a_connection_that_was_connecting_when_it_fired(
    backends: Backends,
    start_proxy: Start,
    connect: Callable[[int], Client],
    full_backend: FullBackend,
    access_ends: Callable[[], list[str]],
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    opts = {"connect_timeout": NEVER, "drain_timeout": "200ms"}
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"slow": (full_backend.address, 1)}, **opts))
    )
    # The first connection takes the backend's one queue place (connected, never accepted);
    # the second one's SYN is dropped.
    established = connect(port)
    wait_until(lambda: running.backend_stat("w", "slow", "total") == 1, what="first connected")
    connecting = connect(port)
    wait_until(lambda: running.state(lambda p: p.open_connections) == 2, what="second accepted")
    assert running.backend_stat("w", "slow", "total") == 1, "the second connect completed"

    running.write_config(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, **opts)))
    assert running.reload().result == "success"

    assert established.is_closed()
    assert connecting.is_closed(), "the connection still connecting at the deadline survived it"
    wait_until(lambda: access_ends() == ["drain_deadline"] * 2, what="both access log lines")


def test_a_listener_removed_while_connecting_lives_until_its_connection_ends(
    backends: Backends,
    start_proxy: Start,
    connect: Callable[[int], Client],
    full_backend: FullBackend,
) -> None:
    full_backend.fill()
    v1 = backends.start("v1")
    port, other = free_port(), free_port()
    opts = {"connect_timeout": NEVER, "drain_timeout": NEVER}
    stays = listener_yaml("other", other, {"v1": (v1, 1)})
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"slow": (full_backend.address, 1)}, **opts), stays)
    )
    client = connect(port)
    await_connecting(running, "w", "slow", 1)

    running.write_config(config_yaml(stays))
    assert running.reload().result == "success"

    listeners = {lst["name"]: lst for lst in running.state(status)["listeners"]}
    assert "w" in listeners, "the removed listener was forgotten while its connection connected"
    assert (listeners["w"]["state"], listeners["w"]["open_connections"]) == ("removed", 1)
    slow = backend_status(running, "w", "slow")
    assert slow is not None
    assert (slow["state"], slow["active_connections"]) == ("draining", 1)
    running.shutdown(0)
    assert client.is_closed(), "shutdown did not close the connection still connecting"


def test_a_listener_removed_while_a_proxy_header_is_awaited_lives_until_it_ends(
    backends: Backends, start_proxy: Start, connect: Callable[[int], Client]
) -> None:
    v1 = backends.start("v1")
    port, other = free_port(), free_port()
    stays = listener_yaml("other", other, {"v1": (v1, 1)})
    waiting = listener_yaml(
        "w", port, {"v1": (v1, 1)}, connect_timeout=NEVER, proxy_protocol="{accept: true}"
    )
    running = start_proxy(config_yaml(waiting, stays))
    client = connect(port)  # and no header: the proxy waits for it, with no backend yet
    wait_until(lambda: running.state(lambda p: p.open_connections) == 1, what="accepted")

    running.write_config(config_yaml(stays))
    assert running.reload().result == "success"

    listeners = {lst["name"]: lst for lst in running.state(status)["listeners"]}
    assert "w" in listeners, "the removed listener was forgotten while a client was in it"
    assert listeners["w"]["open_connections"] == 1
    running.shutdown(0)
    assert client.is_closed(), "shutdown did not close the client waiting to send its header"


def test_shutdown_closes_a_connection_still_connecting(
    start_proxy: Start, connect: Callable[[int], Client], full_backend: FullBackend
) -> None:
    full_backend.fill()
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml("w", port, {"slow": (full_backend.address, 1)}, connect_timeout=NEVER)
        )
    )
    client = connect(port)
    await_connecting(running, "w", "slow", 1)
    slow = backend_status(running, "w", "slow")
    assert slow is not None
    assert slow["active_connections"] == 1, "/status does not count a connection connecting"
    running.shutdown(0)
    assert client.is_closed()
    assert running.state(lambda p: p.open_connections) == 0


def test_a_retried_connection_moves_to_its_new_backend(
    backends: Backends,
    start_proxy: Start,
    connect: Callable[[int], Client],
    full_backend: FullBackend,
) -> None:
    """Connecting to a removed backend, then refused by it: the retry on another backend
    takes the connection with it, and the drained backend is forgotten."""
    full_backend.fill()
    v1 = backends.start("v1")
    port = free_port()
    opts = {"connect_timeout": NEVER, "drain_timeout": NEVER}
    running = start_proxy(
        config_yaml(
            listener_yaml("w", port, {"slow": (full_backend.address, 1), "v1": (v1, 0)}, **opts)
        )
    )
    client = connect(port)
    await_connecting(running, "w", "slow", 1)
    running.write_config(config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, **opts)))
    assert running.reload().result == "success"
    slow = backend_status(running, "w", "slow")
    assert slow is not None
    assert slow["active_connections"] == 1

    full_backend.refuse()  # the kernel's next try of the SYN is refused: retried on v1
    assert client.greeting() == "v1"
    assert client.echo(b"moved\n") == b"moved\n"
    wait_until(lambda: backend_status(running, "w", "slow") is None, what="slow forgotten")
    v1_status = backend_status(running, "w", "v1")
    assert v1_status is not None
    assert v1_status["active_connections"] == 1
