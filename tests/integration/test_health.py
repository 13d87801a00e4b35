"""Backend health over real sockets: passive ejection and active checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness import (
    Backends,
    Client,
    RunningProxy,
    config_yaml,
    free_port,
    greetings,
    listener_yaml,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")


def with_block(listener: str, block: str) -> str:
    return listener + "".join(f"    {line}\n" for line in block.strip("\n").splitlines())


def test_passive_ejection_stops_the_attempts_while_it_lasts(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    port = free_port()
    listener = listener_yaml("w", port, {"v2": (f"127.0.0.1:{free_port()}", 1), "v1": (v1, 1)})
    # An hour: however slowly the greetings below run, the ejection outlasts them.
    running = start_proxy(
        config_yaml(with_block(listener, "ejection:\n  consecutive_failures: 2\n  duration: 1h"))
    )
    assert greetings(port, 10) == {"v1": 10}
    failures = running.backend_stat("w", "v2", "connect_failures")
    assert failures["refused"] == 2  # then ejected: no more attempts while ejected
    assert running.backend_stat("w", "v2", "state") == "unhealthy"


def test_an_ejected_backend_is_tried_again_after_the_duration(
    backends: Backends,
    start_proxy: Callable[[str], RunningProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    v1 = backends.start("v1")
    dead_port = free_port()
    port = free_port()
    listener = listener_yaml("w", port, {"v2": (f"127.0.0.1:{dead_port}", 1), "v1": (v1, 1)})
    running = start_proxy(
        config_yaml(with_block(listener, "ejection:\n  consecutive_failures: 2\n  duration: 1s"))
    )

    def refused() -> int:
        return int(running.backend_stat("w", "v2", "connect_failures")["refused"])

    def refused_twice_after_one_more() -> bool:
        assert greetings(port, 1) == {"v1": 1}  # served by v1 whoever refused it first
        return refused() >= 2

    # Connections one by one until v2 is ejected, however long that takes here: the second
    # refusal ejects it.
    wait_until(refused_twice_after_one_more, what="v2 refused twice")
    # (Its state may already be active again on a slow machine: the log says it happened.)
    ejections = [r for r in caplog.records if "w/v2 ejected for 1s" in r.getMessage()]
    assert len(ejections) == 1
    # It comes back in the rotation after the ejection; it is up now, so traffic returns.
    # Nothing connects until then, so no attempt can fail before it listens.
    backends.start("v2", port=dead_port)
    wait_until(lambda: running.backend_stat("w", "v2", "state") == "active", what="readmitted")
    assert greetings(port, 4) == {"v1": 2, "v2": 2}
    assert refused() == 2


def test_when_every_backend_is_ejected_they_are_tried_anyway(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    """A rolling restart: both backends refuse for a moment and get ejected for a long
    time; once they listen again, clients are served before the ejections expire."""
    ports = {"v1": free_port(), "v2": free_port()}
    port = free_port()
    listener = listener_yaml("w", port, {n: (f"127.0.0.1:{p}", 1) for n, p in ports.items()})
    running = start_proxy(
        config_yaml(with_block(listener, "ejection:\n  consecutive_failures: 1\n  duration: 1h"))
    )
    client = Client(port)
    assert client.read_line() == ""  # refused by both: closed
    client.close()
    for name in ports:
        assert running.backend_stat("w", name, "state") == "unhealthy"
    for name, backend_port in ports.items():
        backends.start(name, port=backend_port)
    assert greetings(port, 4) == {"v1": 2, "v2": 2}
    assert running.backend_stat("w", "v1", "state") == "unhealthy"  # still ejected


def test_active_checks_take_a_dead_backend_out_and_bring_it_back(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1 = backends.start("v1")
    v2_port = free_port()
    port = free_port()
    listener = listener_yaml("w", port, {"v1": (v1, 1), "v2": (f"127.0.0.1:{v2_port}", 1)})
    check = """
health_check:
  interval: 50ms
  timeout: 10s
  healthy_threshold: 2
  unhealthy_threshold: 2
  expect: "hello from v"
"""
    running = start_proxy(config_yaml(with_block(listener, check)))
    wait_until(lambda: running.backend_stat("w", "v2", "state") == "unhealthy", what="marked down")
    assert running.metric("tcpproxy_backend_up", listener="w", backend="v2") == 0
    assert greetings(port, 6) == {"v1": 6}
    # No client paid for finding out: v2 was never tried for a client connection.
    assert sum(running.backend_stat("w", "v2", "connect_failures").values()) == 0
    backends.start("v2", port=v2_port)
    wait_until(lambda: running.backend_stat("w", "v2", "state") == "active", what="back up")
    assert running.metric("tcpproxy_backend_up", listener="w", backend="v2") == 1
    assert greetings(port, 6) == {"v1": 3, "v2": 3}


def test_unhealthy_backend_keeps_its_pinned_connections(
    backends: Backends, start_proxy: Callable[[str], RunningProxy]
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    listener = listener_yaml("w", port, {"v1": (v1, 1), "v2": (v2, 1)})
    running = start_proxy(config_yaml(listener))
    pinned = [Client(port), Client(port)]
    assert sorted(c.greeting() for c in pinned) == ["v1", "v2"]
    # A check v2 fails (wrong greeting expected): it goes down for new connections only. One
    # failure is enough, so v1's checks get a timeout no loaded machine comes near.
    strict = """
health_check:
  interval: 50ms
  timeout: 10s
  unhealthy_threshold: 1
  expect: "hello from v1"
"""
    running.write_config(config_yaml(with_block(listener, strict)))
    assert running.reload().result == "success"
    wait_until(lambda: running.backend_stat("w", "v2", "state") == "unhealthy", what="v2 down")
    assert greetings(port, 4) == {"v1": 4}
    for c in pinned:
        assert c.echo(b"still pinned\n") == b"still pinned\n"
        c.close()
