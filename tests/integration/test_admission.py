"""Connection slots that silent clients cannot take from everyone else, over real sockets:
the per-client-address limit, the listen queue at max_connections, and the first-byte
timeout. Clients come from their own loopback addresses (127.0.0.2, 127.0.0.3, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

from tcpproxy import proxy_protocol
from tests.harness import (
    WAIT_S,
    Backends,
    Client,
    RunningProxy,
    config_yaml,
    free_port,
    listener_yaml,
    proxy_accept_queue,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")

Start = Callable[[str], RunningProxy]
SILENT_HOST = "127.0.0.2"
LEGIT_HOST = "127.0.0.3"


class ClientFrom(Client):
    """A Client whose connection comes from `source` (any 127.0.0.0/8 address)."""

    def __init__(self, port: int, source: str, timeout: float = WAIT_S) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )


class Echo(asyncio.Protocol):
    """A backend that speaks only when spoken to (HTTP, TLS, Redis...): no greeting."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@contextlib.contextmanager
def silent_clients(port: int, sources: list[str]) -> Iterator[list[socket.socket]]:
    """Connections that never send a byte, one from each of `sources`. Connecting does not
    wait for the proxy: the kernel completes the handshake whether or not it accepts."""
    socks = []
    try:
        for source in sources:
            s = socket.socket()
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def rejected(running: RunningProxy, listener: str, reason: str) -> float | None:
    return running.metric("tcpproxy_connections_rejected_total", listener=listener, reason=reason)


def closed(running: RunningProxy, listener: str, backend: str, reason: str) -> float | None:
    return running.metric(
        "tcpproxy_connections_closed_total", listener=listener, backend=backend, reason=reason
    )


def test_silent_clients_from_one_address_leave_the_others_served_with_the_defaults(
    backends: Backends, start_proxy: Start
) -> None:
    """The slowloris report: more silent connections than max_connections, from one address,
    used to take every slot (and a backend connection each) for the whole idle timeout."""
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, max_connections=50))
    )
    share = 5  # the default max_connections_per_client: a tenth of max_connections
    with silent_clients(port, [SILENT_HOST] * 60):
        wait_until(
            lambda: rejected(running, "w", "max_connections_per_client") == 60 - share,
            what="the silent address held to its share",
        )
        assert running.state(lambda p: p.open_connections) == share
        assert len(running.backend_stat("w", "v1", "connections")) == share
        # Everyone else gets in at once, many connections each.
        others = [ClientFrom(port, f"127.0.0.{3 + i % 5}") for i in range(20)]
        assert [c.greeting() for c in others] == ["v1"] * 20
        assert others[0].echo(b"served\n") == b"served\n"
        for c in others:
            c.close()
    assert rejected(running, "w", "max_connections") == 0


def test_the_per_client_limit_counts_each_address_and_frees_a_slot_on_close(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(listener_yaml("w", port, {"v1": (v1, 1)}, max_connections_per_client=2))
    )
    first = [ClientFrom(port, SILENT_HOST) for _ in range(2)]
    assert [c.greeting() for c in first] == ["v1", "v1"]
    over = ClientFrom(port, SILENT_HOST)
    assert over.is_closed()  # closed at once, counted, no backend contacted
    over.close()
    assert rejected(running, "w", "max_connections_per_client") == 1
    assert running.backend_stat("w", "v1", "total") == 2
    # Another address has its own count.
    other = ClientFrom(port, LEGIT_HOST)
    assert other.greeting() == "v1"
    other.close()
    # One of the first two leaves: its address may open one more.
    first[0].close()
    wait_until(
        lambda: running.state(lambda p: p.listeners["w"].admission.per_client) == {SILENT_HOST: 1}
    )
    again = ClientFrom(port, SILENT_HOST)
    assert again.greeting() == "v1"
    for c in (again, first[1]):
        c.close()
    wait_until(lambda: running.state(lambda p: p.listeners["w"].admission.per_client) == {})
    assert rejected(running, "w", "max_connections_per_client") == 1


def test_zero_turns_the_per_client_limit_off(backends: Backends, start_proxy: Start) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w", port, {"v1": (v1, 1)}, max_connections=20, max_connections_per_client=0
            )
        )
    )
    held = [ClientFrom(port, SILENT_HOST) for _ in range(20)]
    assert [c.greeting() for c in held] == ["v1"] * 20
    for c in held:
        c.close()
    assert rejected(running, "w", "max_connections_per_client") == 0


def test_with_proxy_protocol_the_limit_counts_the_headers_source_address(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w",
                port,
                {"v1": (v1, 1)},
                max_connections_per_client=2,
                proxy_protocol="{accept: true}",
            )
        )
    )

    def through_lb(source: str) -> Client:
        # Every connection comes from the load balancer's one address (127.0.0.1).
        client = Client(port)
        client.sock.sendall(proxy_protocol.build("v1", (source, 40000), ("127.0.0.1", port)))
        return client

    held = [through_lb("10.0.0.1") for _ in range(2)]
    assert [c.greeting() for c in held] == ["v1", "v1"]
    over = through_lb("10.0.0.1")
    assert over.is_closed()
    over.close()
    others = [through_lb(f"10.0.0.{i}") for i in (2, 3, 4)]
    assert [c.greeting() for c in others] == ["v1"] * 3
    for c in held + others:
        c.close()
    assert rejected(running, "w", "max_connections_per_client") == 1


def test_at_max_connections_new_clients_wait_in_the_listen_queue(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w", port, {"v1": (v1, 1)}, max_connections=4, max_connections_per_client=0
            )
        )
    )
    held = [ClientFrom(port, SILENT_HOST) for _ in range(4)]
    assert [c.greeting() for c in held] == ["v1"] * 4
    waiting = [ClientFrom(port, LEGIT_HOST) for _ in range(3)]
    wait_until(lambda: proxy_accept_queue(running, "w") == 3, what="three clients queued")
    assert running.state(lambda p: p.listeners["w"].full)
    # Each slot that frees takes the next one from the queue; nothing is turned away.
    for i, c in enumerate(waiting):
        held[i].close()
        assert c.greeting() == "v1"
    wait_until(lambda: proxy_accept_queue(running, "w") == 0)
    assert rejected(running, "w", "max_connections") == 0
    for c in held[3:] + waiting:
        c.close()
    wait_until(lambda: running.state(lambda p: p.open_connections) == 0)
    assert not running.state(lambda p: p.listeners["w"].full)


def test_a_reload_that_raises_max_connections_takes_the_waiting_clients(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1")
    port = free_port()

    def config(max_connections: int) -> str:
        return config_yaml(
            listener_yaml(
                "w",
                port,
                {"v1": (v1, 1)},
                max_connections=max_connections,
                max_connections_per_client=0,
            )
        )

    running = start_proxy(config(1))
    held = Client(port)
    assert held.greeting() == "v1"
    waiting = Client(port)
    wait_until(lambda: proxy_accept_queue(running, "w") == 1, what="one client queued")
    running.write_config(config(2))
    assert running.reload().result == "success"
    assert waiting.greeting() == "v1"
    for c in (held, waiting):
        c.close()


def test_silent_clients_from_many_addresses_are_closed_at_the_first_byte_timeout(
    backends: Backends, start_proxy: Start
) -> None:
    """Many addresses, each within its limit, fill every slot and say nothing: at the
    first-byte timeout they are closed, and the client queued behind them is served."""
    backend = backends.start("quiet", Echo)
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w", port, {"quiet": (backend, 1)}, max_connections=20, first_byte_timeout="300ms"
            )
        )
    )
    sources = [f"127.0.1.{i}" for i in range(1, 21)]
    with silent_clients(port, sources) as silent:
        legit = ClientFrom(port, LEGIT_HOST)
        legit.sock.sendall(b"ping\n")  # waits in the queue with its request
        assert legit.read_exactly(5) == b"ping\n"
        legit.close()
        for s in silent:
            s.setblocking(True)
            s.settimeout(WAIT_S)
            assert s.recv(1) == b""  # closed cleanly: nothing was held for it
    assert closed(running, "w", "quiet", "first_byte_timeout") == 20


def test_the_first_byte_timeout_spares_a_connection_on_which_either_side_spoke(
    backends: Backends, start_proxy: Start
) -> None:
    quiet, greeter = backends.start("quiet", Echo), backends.start("greeter")
    port = free_port()
    running = start_proxy(
        config_yaml(
            listener_yaml(
                "w",
                port,
                # Smooth weighted round-robin with equal weights: greeter, quiet, greeter...
                {"greeter": (greeter, 1), "quiet": (quiet, 1)},
                first_byte_timeout="300ms",
            )
        )
    )
    greeted = Client(port)  # the backend spoke first (its greeting); the client never does
    assert greeted.greeting() == "greeter"
    spoke = Client(port)  # the client spoke once, then went quiet
    assert spoke.echo(b"x") == b"x"
    silent = Client(port)  # greeter: skip it, so that the fourth goes to quiet
    assert silent.greeting() == "greeter"
    silent.close()
    nothing = Client(port)  # quiet backend, silent client
    # Opened after the other two: by the sweep that closes it they were past the timeout too.
    assert nothing.is_closed()
    assert greeted.echo(b"still here\n") == b"still here\n"
    assert spoke.echo(b"y") == b"y"
    for c in (greeted, spoke, nothing):
        c.close()
    assert closed(running, "w", "quiet", "first_byte_timeout") == 1
    assert not closed(running, "w", "greeter", "first_byte_timeout")  # no such series
