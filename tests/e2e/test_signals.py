"""Signals to `tcpproxy run` at awkward moments: during start-up, during the graceful wait."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

from tests.e2e.processes import EXIT_S, START_S, Process, http, port_open
from tests.harness import Client, config_yaml, free_port, listener_yaml, wait_until


def open_writer(fifo: Path) -> int | None:
    """The FIFO's write end, once a reader has it open (until then: None)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


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

    # The config is a FIFO: start-up holds in its first read of the config until we write it,
    # and the test sees when it got there (a writer can open the FIFO once a reader has).
    path = tmp_path / "tcpproxy.yaml"
    os.mkfifo(path)
    proc = Process(
        "run",
        "--config", str(path),
        "--admin", f"127.0.0.1:{admin}",
        "--no-watch",
        "--poll-interval", "0",
        "--log-format", "json",
    )  # fmt: skip
    try:
        fds: list[int] = []

        def reading() -> bool:
            if proc.popen.poll() is not None:
                return True  # exited: the assertion below says how
            fd = open_writer(path)
            if fd is not None:
                fds.append(fd)
            return bool(fds)

        wait_until(reading, timeout=START_S, what="the proxy reading its config")
        assert proc.popen.poll() is None, proc.wait()
        (writer,) = fds
        for _ in range(3):
            proc.signal(signal.SIGHUP)
        # What the SIGHUP asks for: the file as it is now (v2), not what start-up reads (v1).
        edited = tmp_path / "edited.yaml"
        edited.write_text(routes(0, 1))
        edited.replace(path)
        os.write(writer, routes(1, 0).encode())
        os.close(writer)

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
    finally:
        held.close()
        proc.kill()
