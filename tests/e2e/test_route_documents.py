"""Istio VirtualService and Gateway API TCPRoute files with the CLI as users run it: check,
convert, and a live weight edit of a running proxy's VirtualService."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.processes import REPO, START_S, TCPPROXY, Process, echo_processes, http
from tests.harness import Client, free_port, greetings, wait_until

FIXTURES = Path("tests") / "fixtures" / "routes"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TCPPROXY, *args], cwd=REPO, check=False, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["istio-tcp-echo", "gateway-tcproute"])
def test_check_accepts_and_convert_prints_the_native_twin(name: str) -> None:
    checked = cli("check", "--config", str(FIXTURES / f"{name}.yaml"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{FIXTURES / name}.yaml: ok (1 listener, 2 backends")
    converted = cli("convert", str(FIXTURES / f"{name}.yaml"))
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == (REPO / FIXTURES / f"{name}.native.yaml").read_text()


def test_check_and_convert_reject_subsets_one_line_each() -> None:
    path = FIXTURES / "istio-tcp-echo-subsets.yaml"
    for result in (cli("check", "--config", str(path)), cli("convert", str(path))):
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert [line.split(": cannot be mapped")[0] for line in lines] == [
            f"{path}: VirtualService tcp-echo: spec.tcp[0].route[{i}].destination.subset"
            for i in (0, 1)
        ]


@pytest.fixture
def versions() -> Iterator[dict[str, str]]:
    """`tcpproxy echo` v1 on 127.0.0.2 and v2 on 127.0.0.3: hosts a VirtualService names."""
    yield from echo_processes({"v1": "127.0.0.2", "v2": "127.0.0.3"})


def virtual_service(port: int, versions: dict[str, str], w1: int, w2: int) -> str:
    def destination(address: str, weight: int) -> dict[str, object]:
        host, backend_port = address.rsplit(":", 1)
        return {
            "destination": {"host": host, "port": {"number": int(backend_port)}},
            "weight": weight,
        }

    return (
        yaml.safe_dump(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": "tcp-echo"},
                "spec": {
                    "hosts": ["*"],
                    "tcp": [
                        {
                            "match": [{"port": port}],
                            "route": [
                                destination(versions["v1"], w1),
                                destination(versions["v2"], w2),
                            ],
                        }
                    ],
                },
            }
        )
        + f'---\nlisteners:\n  - name: tcp-echo\n    bind: "127.0.0.1:{port}"\n'
    )


def test_editing_a_virtual_services_weights_live(tmp_path: Path, versions: dict[str, str]) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "routes" / "tcpproxy.yaml"
    path.parent.mkdir()
    path.write_text(virtual_service(port, versions, 80, 20))
    proc = Process("run", "--config", str(path), "--admin", f"127.0.0.1:{admin}")

    def applied() -> str | None:
        code, body = http(f"http://127.0.0.1:{admin}/status")
        return json.loads(body)["sha256"] if code == 200 else None

    try:
        wait_until(
            lambda: http(f"http://127.0.0.1:{admin}/readyz")[0] == 200,
            timeout=START_S,
            what="ready",
        )
        assert greetings(port, 10) == {"v1": 8, "v2": 2}
        # Smooth weighted round-robin at 80/20 never picks v2 twice in a row.
        held = Client(port)
        if held.greeting() != "v1":
            held.close()
            held = Client(port)
            assert held.greeting() == "v1"
        # An editor's save: a new file renamed over the old one, seen by the directory watch.
        edited = virtual_service(port, versions, 0, 100)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(edited)
        tmp.replace(path)
        wait_until(
            lambda: applied() == hashlib.sha256(edited.encode()).hexdigest(),
            timeout=START_S,
            what="the edited VirtualService applied",
        )
        assert greetings(port, 10) == {"v2": 10}
        assert held.echo(b"still pinned\n") == b"still pinned\n"
        # Backends are named by their hosts; the held connection is v1's, at weight 0.
        (listener,) = json.loads(http(f"http://127.0.0.1:{admin}/status")[1])["listeners"]
        assert [
            (b["name"], b["weight"], b["state"], b["active_connections"])
            for b in listener["backends"]
        ] == [("127.0.0.2", 0, "zero", 1), ("127.0.0.3", 100, "active", 0)]
        held.close()
        proc.signal(signal.SIGTERM)
        code, _, err = proc.wait()
        assert code == 0, err
    finally:
        proc.kill()
