"""Run inside a fresh network namespace with few local ports (tests/e2e/test_limits.py starts
it under `unshare -n`): two echo backends, the proxy with a rollout between them, and more
clients than there are local ports toward the backends. Prints one JSON object: how many
clients were served and refused, the proxy's /status and its log."""

from __future__ import annotations

import json
import signal
import socket
import sys
from functools import partial
from pathlib import Path

from tests.e2e.processes import START_S, Process, http
from tests.harness import config_yaml, listener_yaml, wait_until

PORTS = 50  # local ports in the namespace: net.ipv4.ip_local_port_range
CLIENTS = 140  # enough to use every port toward both backends, and then some


CLIENT_PORTS = 30000  # the clients' own ports, outside that range


def served(port: int, client_port: int) -> socket.socket | None:
    """A client from `client_port`: the socket if the backend greeted it, else None."""
    sock = socket.socket()
    sock.settimeout(START_S)
    # A port of its own: one bound from the local range (port 0) would be taken from those
    # the proxy has for its backend connections (connect() never reuses a bound port).
    sock.bind(("127.0.0.1", client_port))
    sock.connect(("127.0.0.1", port))
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        data = b""
    if data.startswith(b"hello from"):
        return sock
    sock.close()
    return None


def listening(port: int) -> bool:
    """A socket listens on `port` (asked of the kernel: a test connection would spend a
    local port toward it)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return True
    return False


def main(directory: Path) -> int:
    echo_ports = {"v1": 9101, "v2": 9102}
    backends = [
        Process("echo", "--listen", f"127.0.0.1:{p}", "--name", name)
        for name, p in echo_ports.items()
    ]
    port, admin = 8008, 9901
    config = directory / "tcpproxy.yaml"
    rollout = "    rollout: {from: v1, to: v2, steps: [50], step_duration: 1h}\n"
    config.write_text(
        config_yaml(
            listener_yaml(
                "app",
                port,
                {"v1": ("127.0.0.1:9101", 1), "v2": ("127.0.0.1:9102", 0)},
                engine="copy",
            )
            + rollout
        )
    )
    proxy = Process(
        "run", "--config", str(config), "--admin", f"127.0.0.1:{admin}", "--no-access-log"
    )
    held: list[socket.socket] = []
    refused = 0
    try:
        for p in echo_ports.values():
            wait_until(partial(listening, p), timeout=START_S, what=f"echo on {p}")
        # Ready by the admin port: a probe through the proxy would spend a port toward a
        # backend (TIME_WAIT) before the test begins.
        wait_until(
            lambda: http(f"http://127.0.0.1:{admin}/readyz")[0] == 200,
            timeout=START_S,
            what="proxy ready",
        )
        for i in range(CLIENTS):
            sock = served(port, CLIENT_PORTS + i)
            if sock is None:
                refused += 1
            else:
                held.append(sock)
        _, status = http(f"http://127.0.0.1:{admin}/status")
    finally:
        for sock in held:
            sock.close()
        proxy.signal(signal.SIGTERM)
        _, _, log = proxy.wait()
        for backend in backends:
            backend.signal(signal.SIGTERM)
            backend.wait()
    print(
        json.dumps(
            {"served": len(held), "refused": refused, "status": json.loads(status), "log": log}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
