"""`balance: client_hash` over real connections from many client addresses (127.0.0.0/8):
sticky across reconnects, reloads, failures and rollout steps, exactly as the pure mapping
(tcpproxy/affinity.py) says."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from tcpproxy.proxy import Proxy
from tests.harness import (
    Backends,
    Client,
    RunningProxy,
    client_hash_mapping,
    config_yaml,
    free_port,
    greetings_from,
    listener_yaml,
    move_wall_clock,
    wait_until,
)

Start = Callable[[str], RunningProxy]
SOURCES = [f"127.0.0.{i}" for i in range(2, 42)]


def routes(port: int, addresses: dict[str, str], weights: dict[str, int], **options: object) -> str:
    backends = {name: (addresses[name], w) for name, w in weights.items()}
    return config_yaml(listener_yaml("app", port, backends, balance="client_hash", **options))


def test_clients_stick_across_reconnects_weight_changes_and_removals(
    backends: Backends, start_proxy: Start
) -> None:
    addresses = {name: backends.start(name) for name in ("v1", "v2", "v3")}
    port = free_port()
    weights = {"v1": 1, "v2": 1, "v3": 1}
    running = start_proxy(routes(port, addresses, weights))
    first = greetings_from(port, SOURCES)
    assert first == client_hash_mapping(weights, SOURCES)
    assert set(first.values()) == {"v1", "v2", "v3"}
    assert greetings_from(port, SOURCES) == first  # reconnects land where they did
    held = {}
    for name in ("v1", "v2"):
        source = next(s for s, b in first.items() if b == name)
        held[name] = Client(port, source=source)
        assert held[name].greeting() == name

    # v3's weight 1 -> 4: clients move to v3 only, as the mapping says; open ones stay.
    weights["v3"] = 4
    running.write_config(routes(port, addresses, weights))
    assert running.reload().result == "success"
    raised = greetings_from(port, SOURCES)
    assert raised == client_hash_mapping(weights, SOURCES)
    assert all(raised[s] in (first[s], "v3") for s in SOURCES)
    assert raised != first

    # v2 removed (draining): only its clients move, to their next-best; the rest stay.
    del weights["v2"]
    running.write_config(routes(port, addresses, weights))
    assert running.reload().result == "success"
    removed = greetings_from(port, SOURCES)
    assert removed == client_hash_mapping(weights, SOURCES)
    assert all(removed[s] == raised[s] for s in SOURCES if raised[s] != "v2")
    assert running.backend_stat("app", "v2", "draining")
    for name, client in held.items():
        assert client.echo(f"still on {name}\n".encode()) == f"still on {name}\n".encode()
        client.close()

    # v1 moved to another address (same name): its clients follow it, no one else moves.
    addresses["v1"] = backends.start("v1-moved")
    running.write_config(routes(port, addresses, weights))
    assert running.reload().result == "success"
    moved = greetings_from(port, SOURCES)
    assert moved == {s: "v1-moved" if b == "v1" else b for s, b in removed.items()}

    # A bad reload keeps the mapping in force.
    running.write_config(routes(port, addresses, weights).replace("client_hash", "sticky"))
    result = running.reload()
    assert result.result == "failure"
    assert result.problems == (
        f"{running.config_path}: listeners[0].balance: "
        "Input should be 'round_robin' or 'client_hash'",
    )
    assert greetings_from(port, SOURCES) == moved


def test_a_failing_backend_gives_up_only_its_clients_until_it_is_back(
    backends: Backends, start_proxy: Start
) -> None:
    ports = {name: free_port() for name in ("v1", "v2", "v3")}
    addresses = {name: backends.start(name, port=ports[name]) for name in ports}
    port = free_port()
    weights = {"v1": 1, "v2": 1, "v3": 1}
    # No ejection: every client of v2 tries it first, is refused, and is retried elsewhere.
    start_proxy(routes(port, addresses, weights, ejection="null"))
    before = greetings_from(port, SOURCES)
    backends.stop("v2")
    during = greetings_from(port, SOURCES)
    without_v2 = {"v1": 1, "v3": 1}
    assert during == client_hash_mapping(without_v2, SOURCES)  # its clients: their next-best
    assert all(during[s] == before[s] for s in SOURCES if before[s] != "v2")
    backends.start("v2", port=ports["v2"])
    assert greetings_from(port, SOURCES) == before


def test_the_proxy_header_source_is_the_client(backends: Backends, start_proxy: Start) -> None:
    addresses = {name: backends.start(name) for name in ("v1", "v2")}
    port = free_port()
    weights = {"v1": 1, "v2": 1}
    start_proxy(routes(port, addresses, weights, proxy_protocol="{accept: true}"))
    sources = [f"203.0.113.{i}" for i in range(1, 31)]
    seen: dict[str, str | None] = {}
    for source in sources * 2:  # each twice: the same backend again
        client = Client(port)  # every connection comes from 127.0.0.1, the "load balancer"
        client.sock.sendall(f"PROXY TCP4 {source} 198.51.100.1 40000 8008\r\n".encode())
        backend = client.greeting()
        assert seen.setdefault(source, backend) == backend
        client.close()
    assert seen == client_hash_mapping(weights, sources)
    assert set(seen.values()) == {"v1", "v2"}


def test_rollout_steps_move_clients_only_from_from_to_to(
    backends: Backends, start_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = move_wall_clock(monkeypatch)  # hour-long steps on a clock the test moves
    addresses = {name: backends.start(name) for name in ("v1", "v2", "v3")}
    port = free_port()
    weights = {"v1": 1, "v2": 0, "v3": 1}
    rollout = "rollout: {from: v1, to: v2, steps: [20, 50, 80], step_duration: 1h}"
    running = start_proxy(routes(port, addresses, weights).rstrip("\n") + f"\n    {rollout}\n")

    def share(proxy: Proxy) -> int | None:
        split = proxy.listeners["app"].pool.rollout_split()
        return None if split is None else split[2]

    plain = client_hash_mapping(weights, SOURCES)
    previous = None
    for step, percent in enumerate((20, 50, 80)):
        clock.offset_s = step * 3600 + 60
        wait_until(partial(lambda p: running.state(share) == p, percent), what=f"{percent}%")
        now = greetings_from(port, SOURCES)
        assert running.state(share) == percent, "the step changed while connecting"
        assert now == client_hash_mapping(weights, SOURCES, ("v1", "v2", percent))
        # The bystander v3 keeps exactly its clients; the pair's move one way only.
        assert {s for s in SOURCES if now[s] == "v3"} == {s for s in SOURCES if plain[s] == "v3"}
        if previous is not None:
            assert all(now[s] == previous[s] or previous[s] == "v1" for s in SOURCES)
        previous = now
    assert previous is not None
    assert "v2" in previous.values()

    assert running.state(lambda p: p.listeners["app"].control_rollout("abort", "the test"))
    aborted = greetings_from(port, SOURCES)
    assert aborted == {s: "v1" if b == "v2" else b for s, b in previous.items()}
