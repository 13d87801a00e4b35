"""Signals to `tcpproxy run` at awkward moments: during start-up, during the graceful wait."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.processes import EXIT_S, REPO, START_S, Process, http, port_open
from tests.harness import Client, config_yaml, free_port, listener_yaml, wait_until

# `tcpproxy run` with its start-up held twice where the test can see it and let it go on: in
# Proxy.start, before the config is read, and after (listeners bound, no reloader yet). Each
# hold touches a marker file, then reads a FIFO until the test closes it.
HELD_RUN = """
import sys
from pathlib import Path

from tcpproxy.proxy import Proxy

start = Proxy.start


def hold(marker: str, fifo: str) -> None:
    Path(marker).touch()
    with open(fifo, "rb") as f:
        f.read()


async def held_start(self: Proxy) -> None:
    hold(*sys.argv[1:3])
    await start(self)
    hold(*sys.argv[3:5])


Proxy.start = held_start  # type: ignore[method-assign]
from tcpproxy.cli import main

sys.exit(main(sys.argv[5:]))
"""


class HeldProcess(Process):
    """`tcpproxy ARGS` whose start-up waits at each hold until `release` is called."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.holds = []
        argv = []
        for name in ("before-config", "after-config"):
            marker, fifo = directory / f"{name}.reached", directory / f"{name}.fifo"
            os.mkfifo(fifo)
            self.holds.append((marker, fifo))
            argv += [str(marker), str(fifo)]
        self.popen = subprocess.Popen(
            [sys.executable, "-c", HELD_RUN, *argv, *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for_hold(self, hold: int) -> None:
        marker = self.holds[hold][0]
        wait_until(
            lambda: marker.exists() or self.popen.poll() is not None,
            timeout=START_S,
            what=f"start-up at {marker.name}",
        )
        assert self.popen.poll() is None, self.wait()

    def release(self, hold: int) -> None:
        os.close(os.open(self.holds[hold][1], os.O_WRONLY))  # EOF for the reader


def test_a_sighup_during_start_up_neither_kills_it_nor_is_lost(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    port, admin = free_port(), free_port()

    def routes(w1: int, w2: int) -> str:
        return config_yaml(
            listener_yaml(
                "app", port, {"v1": (echo_backends["v1"], w1), "v2": (echo_backends["v2"], w2)}
            )
        )

    path = tmp_path / "tcpproxy.yaml"
    path.write_text(routes(1, 0))
    proc = HeldProcess(
        tmp_path,
        "run",
        "--config", str(path),
        "--admin", f"127.0.0.1:{admin}",
        "--no-watch",
        "--poll-interval", "0",
        "--log-format", "json",
    )  # fmt: skip
    try:
        # Before the config is read: nothing to reload yet, and nothing may kill it.
        proc.wait_for_hold(0)
        proc.signal(signal.SIGHUP)
        proc.release(0)
        # The config is read (v1) and the listener bound; the reloader is not up yet. The
        # file changes and a SIGHUP says so: it must be applied once the proxy is up.
        proc.wait_for_hold(1)
        edited = tmp_path / "edited.yaml"
        edited.write_text(routes(0, 1))
        edited.replace(path)
        for _ in range(3):
            proc.signal(signal.SIGHUP)
        proc.release(1)

        def applied_sighup() -> bool:
            assert proc.popen.poll() is None, proc.wait()
            status, body = http(f"http://127.0.0.1:{admin}/status")
            return status == 200 and json.loads(body)["last_reload"]["trigger"] == "sighup"

        wait_until(applied_sighup, timeout=START_S, what="the SIGHUP's reload")
        client = Client(port)
        assert client.greeting() == "v2"
        client.close()
        proc.signal(signal.SIGTERM)
        code, _, err = proc.wait()
        assert code == 0, err
    finally:
        proc.kill()


def process_state(proc: Process) -> str:
    """The state letter in /proc/PID/stat: R, S, T (stopped), ..."""
    stat = Path(f"/proc/{proc.popen.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def held_connection(tmp_path: Path, echo_backends: dict[str, str]) -> tuple[Process, Client, int]:
    """A proxy whose shutdown grace is an hour, and a connection through it."""
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("app", port, {"v1": (echo_backends["v1"], 1)})))
    proc = Process(
        "run", "--config", str(path), "--admin", "off", "--no-watch", "--shutdown-timeout", "1h"
    )
    wait_until(lambda: port_open(port), timeout=START_S, what="listening")
    held = Client(port)
    assert held.greeting() == "v1"
    assert held.echo(b"before\n") == b"before\n"
    return proc, held, port


def test_a_second_signal_right_after_the_first_closes_everything_at_once(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    proc, held, _ = held_connection(tmp_path, echo_backends)
    try:
        # Both signals wait while the process is stopped, and reach it together when it runs
        # on: the second comes before the first has got anywhere.
        proc.signal(signal.SIGSTOP)
        wait_until(lambda: process_state(proc) == "T", what="stopped")
        proc.signal(signal.SIGTERM)
        proc.signal(signal.SIGINT)
        proc.signal(signal.SIGCONT)
        # The grace is an hour: only the second signal can end it within EXIT_S.
        code, _, err = proc.wait(EXIT_S)
        assert code == 0, err
        assert held.is_closed()
        assert "closing all connections now" in err
    finally:
        held.close()
        proc.kill()


def test_during_the_graceful_wait_sighup_is_harmless_and_sigint_ends_it(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    proc, held, port = held_connection(tmp_path, echo_backends)
    try:
        proc.signal(signal.SIGTERM)
        wait_until(lambda: not port_open(port), what="listener closed")
        assert held.echo(b"in the graceful wait\n") == b"in the graceful wait\n"
        proc.signal(signal.SIGHUP)
        assert held.echo(b"after a SIGHUP\n") == b"after a SIGHUP\n"
        assert proc.popen.poll() is None
        proc.signal(signal.SIGINT)
        code, _, err = proc.wait(EXIT_S)
        assert code == 0, err
        assert held.is_closed()
        # The first signal said how long it waits for what, and how to end the wait. The
        # count may include a probe of the test's that raced the signal: not asserted.
        assert re.search(
            r"waiting up to 3600s for \d+ open connections? to finish; a second Ctrl-C", err
        ), err
    finally:
        held.close()
        proc.kill()
