"""A reload that moves a listener to a new address: the new listening socket is made from the
listener's new config, so what the config says applies with a bind change (the engine) does."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tcpproxy.relay import Connection
from tcpproxy.splice import SpliceConnection
from tests.harness import Backends, Client, RunningProxy, config_yaml, free_port, listener_yaml

ENGINES = {"copy": Connection, "splice": SpliceConnection}


@pytest.mark.parametrize(("before", "after"), [("copy", "splice"), ("splice", "copy")])
def test_an_engine_change_made_with_a_bind_change_applies(
    backends: Backends, start_proxy: Callable[[str], RunningProxy], before: str, after: str
) -> None:
    v1 = backends.start("v1")
    old, new = free_port(), free_port()
    running = start_proxy(config_yaml(listener_yaml("w", old, {"v1": (v1, 1)}, engine=before)))
    running.write_config(config_yaml(listener_yaml("w", new, {"v1": (v1, 1)}, engine=after)))
    assert running.reload().result == "success"

    client = Client(new)
    try:
        assert client.greeting() == "v1"
        engines = running.state(lambda p: [type(c) for c in p.listeners["w"].live_connections()])
        assert engines == [ENGINES[after]]
        assert client.echo(b"ping\n") == b"ping\n"
    finally:
        client.close()
