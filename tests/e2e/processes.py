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


def port_open(port: int) -> bool:
    try:
        Client(port, timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def echo_backends() -> Iterator[dict[str, str]]:
    """Two `tcpproxy echo` processes, v1 and v2."""
    procs, addresses = [], {}
    for name in ("v1", "v2"):
        port = free_port()
        procs.append(Process("echo", "--listen", f"127.0.0.1:{port}", "--name", name))
        addresses[name] = f"127.0.0.1:{port}"
        wait_until(partial(port_open, port), timeout=START_S, what=f"echo {name} up")
    yield addresses
    for p in procs:
        p.signal(signal.SIGTERM)
        assert p.wait()[0] == 0
