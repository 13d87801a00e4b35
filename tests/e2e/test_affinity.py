"""`balance: client_hash` as users run it: `tcpproxy run` on the 80/20 tcp-echo shape, weights
edited live in the watched file; `tcpproxy check` on a bad value."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, cast

from tests.e2e.processes import START_S, TCPPROXY, Process, http
from tests.harness import (
    Client,
    client_hash_mapping,
    free_port,
    greetings_from,
    wait_until,
)

SOURCES = [f"127.0.0.{i}" for i in range(2, 42)]


def tcp_echo(port: int, backends: dict[str, str], v1: int, v2: int) -> str:
    """The tcp-echo canary: v1 and v2 by weight, each client address kept on one of them."""
    return f"""\
listeners:
  - name: tcp-echo
    bind: "127.0.0.1:{port}"
    balance: client_hash
    backends:
      - name: v1
        address: "{backends["v1"]}"
        weight: {v1}
      - name: v2
        address: "{backends["v2"]}"
        weight: {v2}
"""


def listener_status(admin: int) -> dict[str, Any]:
    status, body = http(f"http://127.0.0.1:{admin}/status")
    if status != 200:
        return {"backends": []}
    (listener,) = json.loads(body)["listeners"]
    return cast(dict[str, Any], listener)


def weights(admin: int) -> dict[str, int]:
    return {b["name"]: b["weight"] for b in listener_status(admin)["backends"]}


def active(admin: int) -> dict[str, int]:
    return {b["name"]: b["active_connections"] for b in listener_status(admin)["backends"]}


def test_live_weight_edits_move_new_connections_by_the_hash_and_keep_open_ones(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "routes" / "tcpproxy.yaml"
    path.parent.mkdir()
    path.write_text(tcp_echo(port, echo_backends, 80, 20))
    before = client_hash_mapping({"v1": 80, "v2": 20}, SOURCES)
    after = client_hash_mapping({"v1": 20, "v2": 80}, SOURCES)
    movers = [s for s in SOURCES if before[s] != after[s]]
    assert movers
    assert all((before[s], after[s]) == ("v1", "v2") for s in movers)
    # The directory watch starts just after the admin port answers, so an edit made at once
    # may come before it; the 1 s poll catches that one.
    proc = Process(
        "run", "--config", str(path), "--admin", f"127.0.0.1:{admin}", "--poll-interval", "1"
    )
    try:
        wait_until(lambda: http(f"http://127.0.0.1:{admin}/readyz")[0] == 200, START_S, "ready")
        assert weights(admin) == {"v1": 80, "v2": 20}
        assert greetings_from(port, SOURCES) == before
        held = Client(port, source=movers[0])
        assert held.greeting() == "v1"

        # Edited as an editor saves: a new file renamed over the old one.
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tcp_echo(port, echo_backends, 20, 80))
        tmp.replace(path)
        wait_until(lambda: weights(admin) == {"v1": 20, "v2": 80}, what="the edit applied")

        assert greetings_from(port, SOURCES) == after
        # The open connection from a client that now maps to v2 is still on v1.
        assert held.echo(b"pinned\n") == b"pinned\n"
        assert listener_status(admin)["balance"] == "client_hash"
        # The other clients have closed; the proxy sees their ends a moment later.
        wait_until(lambda: active(admin) == {"v1": 1, "v2": 0}, what="only the held one open")
        held.close()
    finally:
        proc.kill()


def test_check_rejects_an_unknown_balance_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(
        tcp_echo(free_port(), {"v1": "127.0.0.1:1", "v2": "127.0.0.1:2"}, 80, 20).replace(
            "client_hash", "source"
        )
    )
    result = subprocess.run(
        [*TCPPROXY, "check", "--config", str(path)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: listeners[0].balance: Input should be 'round_robin' or 'client_hash'"
    ]
