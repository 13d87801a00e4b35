"""The CLI as a process, for e2e tests: start it, talk HTTP to it, and echo backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.harness import Client, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
TCPPROXY = [sys.executable, "-m", "tcpproxy"]
# How long a CLI process may take to start listening, or to exit once told to: an interpreter
# importing aiohttp, pydantic and uvloop takes seconds on a slow, loaded machine. Only a hung
# process waits this long.
START_S = 60.0
EXIT_S = 60.0


class Process:
    def __init__(self, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            [*TCPPROXY, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = EXIT_S) -> tuple[int, str, str]:
        out, err = self.popen.communicate(timeout=timeout)
        return self.popen.returncode, out, err

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate()  # closes the pipes even when it already exited


def http(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        Client(port, host=host, timeout=1).close()
    except OSError:
        return False
    return True


def echo_processes(hosts: dict[str, str]) -> Iterator[dict[str, str]]:
    """`tcpproxy echo` processes, one per name, on the given loopback hosts; their
    addresses while the caller runs, then they are stopped."""
    procs, addresses = [], {}
    for name, host in hosts.items():
        port = free_port()
        procs.append(Process("echo", "--listen", f"{host}:{port}", "--name", name))
        addresses[name] = f"{host}:{port}"
        wait_until(partial(port_open, port, host), timeout=START_S, what=f"echo {name} up")
    yield addresses
    for p in procs:
        p.signal(signal.SIGTERM)
        assert p.wait()[0] == 0


@pytest.fixture
def echo_backends() -> Iterator[dict[str, str]]:
    """Two `tcpproxy echo` processes, v1 and v2."""
    yield from echo_processes({"v1": "127.0.0.1", "v2": "127.0.0.1"})
