"""A VirtualService as the running proxy's config: reloads, pinning, drains and bad files
behave as with native config, over real sockets."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from tests import harness
from tests.harness import Backends, RunningProxy, clients, free_port, greetings

pytestmark = pytest.mark.usefixtures("each_engine")

Start = Callable[[str], RunningProxy]


def routes(port: int, weights: dict[str, int], subset: bool = False) -> str:
    """A VirtualService over backends named by their loopback address, and a native entry
    that binds it to loopback only and gives it a long drain."""
    route = []
    for address, weight in weights.items():
        host, backend_port = address.rsplit(":", 1)
        destination: dict[str, object] = {"host": host, "port": {"number": int(backend_port)}}
        if subset:
            destination["subset"] = "v1"
        route.append({"destination": destination, "weight": weight})
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "app"},
        "spec": {"hosts": ["*"], "tcp": [{"match": [{"port": port}], "route": route}]},
    }
    native = {
        "listeners": [
            {
                "name": "app",
                "bind": f"127.0.0.1:{port}",
                "drain_timeout": "1h",  # no test run reaches it
                "engine": harness.DEFAULT_ENGINE[0],
            }
        ]
    }
    return yaml.safe_dump(vs) + "---\n" + yaml.safe_dump(native)


def test_virtual_service_reloads_keep_connections_pinned_and_drain_removed_ones(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1", host="127.0.0.2")
    v2 = backends.start("v2", host="127.0.0.3")
    n1, n2 = v1.rsplit(":", 1)[0], v2.rsplit(":", 1)[0]  # backend names: their hosts
    port = free_port()
    running = start_proxy(routes(port, {v1: 3, v2: 1}))
    assert greetings(port, 8) == {"v1": 6, "v2": 2}
    with clients(port, 4) as held:
        assert sorted(c.greeting() for c in held) == ["v1", "v1", "v1", "v2"]

        running.write_config(routes(port, {v1: 0, v2: 1}))
        assert running.reload().result == "success"
        assert greetings(port, 4) == {"v2": 4}
        assert running.backend_stat("app", n1, "state") == "zero"
        for i, c in enumerate(held):
            assert c.echo(f"pinned {i}\n".encode()) == f"pinned {i}\n".encode()

        # v1 gone from the route: it drains, its connections live on.
        running.write_config(routes(port, {v2: 1}))
        assert running.reload().result == "success"
        assert running.backend_stat("app", n1, "state") == "draining"
        assert len(running.backend_stat("app", n1, "connections")) == 3
        assert running.backend_stat("app", n2, "state") == "active"
        for c in held:
            assert c.echo(b"while v1 drains\n") == b"while v1 drains\n"

        # A VirtualService that cannot be mapped keeps the last good one serving.
        running.write_config(routes(port, {v1: 1, v2: 0}, subset=True))
        result = running.reload()
        assert result.result == "failure"
        assert any("destination.subset: cannot be mapped" in p for p in result.problems)
        assert greetings(port, 3) == {"v2": 3}
        assert running.backend_stat("app", n1, "state") == "draining"

        # Put back before its deadline: active again, its deadline lifted.
        running.write_config(routes(port, {v1: 1, v2: 1}))
        assert running.reload().result == "success"
        assert running.backend_stat("app", n1, "state") == "active"
        assert running.backend_stat("app", n1, "drain_deadline") is None
        for c in held:
            assert c.echo(b"never moved\n") == b"never moved\n"
