"""Running out of file descriptors: the proxy keeps what it holds and recovers by itself."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.processes import EXIT_S, START_S
from tests.harness import Client, config_yaml, free_port, listener_yaml, wait_until

FD_LIMIT = 64  # the interpreter, uvloop and the watcher use ~20; the rest is ~20 connections


def served(port: int) -> bool:
    try:
        client = Client(port, timeout=5)
    except OSError:
        return False
    try:
        return client.read_line().startswith("hello from")
    except OSError:
        return False
    finally:
        client.close()


def test_fd_exhaustion_keeps_held_connections_and_recovers(tmp_path: Path) -> None:
    echo_port, port = free_port(), free_port()
    echo = subprocess.Popen(
        [sys.executable, "-m", "tcpproxy", "echo", "--listen", f"127.0.0.1:{echo_port}",
         "--name", "v1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("w", port, {"v1": (f"127.0.0.1:{echo_port}", 1)})))
    # The shell lowers the limit for the proxy alone (preexec_fn is unsafe with threads).
    proxy = subprocess.Popen(
        ["sh", "-c", f'ulimit -n {FD_LIMIT} && exec "$0" "$@"', sys.executable, "-m",
         "tcpproxy", "run", "--config", str(path), "--admin", "off", "--no-access-log"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    clients: list[Client] = []
    try:
        wait_until(lambda: served(port), timeout=START_S, what="proxy serving")
        # Far more connections than the proxy has descriptors for.
        greeted = []
        for _ in range(3 * FD_LIMIT // 2):
            try:
                c = Client(port, timeout=5)
            except OSError:
                continue
            clients.append(c)
            try:
                line = c.read_line()
            except OSError:
                line = ""
            if line.startswith("hello from"):
                greeted.append(c)
        assert 5 < len(greeted) < len(clients), (len(greeted), len(clients))
        refused = len(clients) - len(greeted)
        # Everything it did take on still works.
        for c in greeted:
            assert c.echo(b"held\n") == b"held\n"
        assert proxy.poll() is None
        for c in clients:
            c.close()
        clients.clear()
        # Recovered by itself: new connections are served again, one after another.
        wait_until(lambda: served(port), what="recovered")
        assert all(served(port) for _ in range(10))
    finally:
        for c in clients:
            c.close()
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=EXIT_S)
        echo.send_signal(signal.SIGTERM)
        echo.communicate(timeout=EXIT_S)
    assert proxy.returncode == 0
    # At accept or at the backend connect, whichever runs out first.
    exhausted = [line for line in err.splitlines() if "raise the open files limit" in line]
    # Logged, but not once per refused connection. (At most a line every few seconds: how
    # many depends on how long the exhaustion lasted, so no fixed count.)
    assert 1 <= len(exhausted) < refused, err
    assert "Traceback" not in err
