"""The CLI as users run it: real processes, real ports, real signals."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tcpproxy.demo import DEMO_CONFIG
from tests.e2e.processes import EXIT_S, REPO, START_S, TCPPROXY, Process, http, port_open
from tests.harness import WAIT_S, Client, config_yaml, free_port, listener_yaml, wait_until


def after_greeting(out: str) -> str:
    return out.split("hello from", 1)[1] if "hello from" in out else ""


def telnet_session(port: int, line: bytes, done: Callable[[str], bool]) -> str:
    """Type `line` into a real telnet and read what it prints until `done` says so."""
    session = subprocess.Popen(
        ["telnet", "127.0.0.1", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert session.stdin is not None
    assert session.stdout is not None
    out = b""
    try:
        session.stdin.write(line)
        session.stdin.flush()
        deadline = time.monotonic() + WAIT_S
        while not done(out.decode(errors="replace")):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([session.stdout], [], [], max(left, 0))
            assert ready, f"telnet printed {out!r} in {WAIT_S}s"
            chunk = os.read(session.stdout.fileno(), 4096)
            assert chunk, f"telnet ended after printing {out!r}"
            out += chunk
    finally:
        session.stdin.close()
        try:
            session.wait(WAIT_S)
        finally:
            if session.poll() is None:
                session.kill()
                session.wait()
            session.stdout.close()
    return out.decode(errors="replace")


def test_version() -> None:
    result = subprocess.run([*TCPPROXY, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("tcpproxy ")


def test_demo_config_file_matches_the_built_in_one() -> None:
    assert (REPO / "config" / "demo.yaml").read_text() == DEMO_CONFIG


def test_check_valid_invalid_and_missing(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*TCPPROXY, "check", "--config", str(REPO / "config" / "tcpproxy.yaml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "config" / "tcpproxy.yaml").read_text().replace("weight: 80", "weight: x")
    )
    result = subprocess.run(
        [*TCPPROXY, "check", "--config", str(bad)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{bad}: listeners[0].backends[0].weight: Input should be a valid integer"
    ]
    missing = subprocess.run(
        [*TCPPROXY, "check"],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "TCPPROXY_CONFIG": str(tmp_path / "nope.yaml")},
    )
    assert missing.returncode == 1
    assert missing.stderr == f"{tmp_path / 'nope.yaml'}: file not found\n"


def without_tcpproxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TCPPROXY_")}


def test_check_outside_the_checkout_says_the_default_path_is_relative(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TCPPROXY, "check"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=without_tcpproxy_env(),
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"config/tcpproxy.yaml: file not found (the default config path, relative to "
        f"{tmp_path}: give one with --config PATH or TCPPROXY_CONFIG)\n"
    )


def test_check_warns_when_every_weight_is_zero_and_counts_in_words(tmp_path: Path) -> None:
    path = tmp_path / "dark.yaml"
    path.write_text(config_yaml(listener_yaml("app", free_port(), {"v1": ("127.0.0.1:1", 0)})))
    result = subprocess.run(
        [*TCPPROXY, "check", "--config", str(path)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"{path}: listeners[0].backends: every weight is 0")
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout.startswith(f"{path}: ok (1 listener, 1 backend, sha256 ")


def test_echo_with_a_bad_address_is_one_line_and_exit_2() -> None:
    code, _, err = Process("echo", "--listen", "nonsense", "--name", "x").wait()
    assert (code, err) == (2, "--listen: invalid address 'nonsense': expected host:port\n")


def test_rollout_status_without_a_proxy_says_connection_refused() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [*TCPPROXY, "rollout", "status", "--admin", address],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"cannot reach the admin server at {address}: Connection refused (")
    assert "urlopen" not in line
    assert "Errno" not in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_taken_admin_address_is_named_as_it_was_given(tmp_path: Path, how: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_yaml(listener_yaml("app", free_port(), {"v1": ("127.0.0.1:1", 1)})))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = f"127.0.0.1:{taken.getsockname()[1]}"
        if how == "flag":
            proc = Process("run", "--config", str(path), "--admin", admin)
            named = f"--admin {admin}"
        else:
            proc = Process("run", "--config", str(path), env={"TCPPROXY_ADMIN": admin})
            named = f"TCPPROXY_ADMIN={admin}"
        code, _, err = proc.wait()
    assert code == 1
    assert f"{named}: cannot listen: Address already in use\n" in err
    assert "Traceback" not in err


def test_run_with_a_bad_config_exits_1_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listeners:\n  - name: x\n    bind: nowhere\n    backends: []\n")
    proc = Process("run", "--config", str(path), "--admin", "off")
    code, _, err = proc.wait()
    assert code == 1
    assert "Traceback" not in err
    assert err.splitlines() == [
        f"{path}: listeners[0].bind: invalid address 'nowhere': expected host:port",
        f"{path}: listeners[0].backends: at least one backend is required",
    ]


def test_bad_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    proc = Process("run", env={"TCPPROXY_SHUTDOWN_TIMEOUT": "soon"})
    code, _, err = proc.wait()
    assert code == 2
    assert err.startswith("TCPPROXY_SHUTDOWN_TIMEOUT: invalid duration 'soon'")


def test_run_relays_reloads_on_sighup_and_drains_on_sigterm(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "routes" / "tcpproxy.yaml"
    path.parent.mkdir()

    def routes(w1: int, w2: int) -> str:
        return config_yaml(
            listener_yaml(
                "app", port, {"v1": (echo_backends["v1"], w1), "v2": (echo_backends["v2"], w2)}
            )
        )

    path.write_text(routes(1, 0))
    proc = Process(
        "run",
        "--config", str(path),
        "--admin", f"127.0.0.1:{admin}",
        "--no-watch",
        "--poll-interval", "0",
        "--shutdown-timeout", "20s",
        "--log-format", "json",
    )  # fmt: skip
    try:
        wait_until(
            lambda: http(f"http://127.0.0.1:{admin}/readyz")[0] == 200,
            timeout=START_S,
            what="ready",
        )
        held = Client(port)
        assert held.greeting() == "v1"
        assert held.echo(b"hello\n") == b"hello\n"
        # Only SIGHUP can apply this edit: no watch, no poll.
        path.write_text(routes(0, 1))
        proc.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                json.loads(http(f"http://127.0.0.1:{admin}/status")[1])["last_reload"]["trigger"]
                == "sighup"
            ),
            what="SIGHUP reload",
        )
        fresh = Client(port)
        assert fresh.greeting() == "v2"
        fresh.close()
        # SIGTERM: not ready any more, listener closed, the live connection may finish.
        proc.signal(signal.SIGTERM)
        wait_until(lambda: http(f"http://127.0.0.1:{admin}/readyz")[0] == 503, what="503")
        wait_until(lambda: not port_open(port), what="listener closed")
        assert held.echo(b"still served while draining\n") == b"still served while draining\n"
        held.close()
        code, _, err = proc.wait()
        assert code == 0
    finally:
        proc.kill()
    records = [json.loads(line) for line in err.splitlines()]
    assert all({"time", "severity", "message"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "tcpproxy.access"]
    assert [(r["backend"], r["end"]) for r in access] == [
        ("v2", "client_closed"),
        ("v1", "client_closed"),
    ]
    assert access[1]["bytes_up"] == len(b"hello\nstill served while draining\n")
    reloads = [r for r in records if r.get("trigger") == "sighup"]
    assert reloads[0]["result"] == "success"
    assert reloads[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shutdown_timeout_closes_what_is_left(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("app", port, {"v1": (echo_backends["v1"], 1)})))
    proc = Process("run", "--config", str(path), "--admin", "off", "--shutdown-timeout", "300ms")
    try:
        wait_until(lambda: port_open(port), timeout=START_S, what="listening")
        held = Client(port)
        assert held.greeting() == "v1"
        proc.signal(signal.SIGTERM)
        assert held.is_closed(timeout=10)
        held.close()
        code, _, _ = proc.wait()
        assert code == 0
    finally:
        proc.kill()


def test_demo_serves_telnet_on_8008_and_stops_cleanly(tmp_path: Path) -> None:
    # Run outside the checkout: the demo must work from an installed package, too, and
    # leave nothing behind in the temporary directory where it keeps its config.
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = Process("demo", cwd=tmp_path, env={"TMPDIR": str(temp)})
    try:
        wait_until(lambda: port_open(8008), timeout=START_S, what="demo listening on 8008")
        seen = set()
        for _ in range(10):
            c = Client(8008)
            seen.add(c.greeting())
            assert c.echo(b"ping\r\n") == b"ping\r\n"
            c.close()
        assert seen == {"v1", "v2"}  # 80/20: 10 connections reach both
        status, page = http("http://127.0.0.1:9901/")
        assert status == 200
        assert "v1" in page
        assert "v2" in page
        # The README walkthrough with the real telnet: the greeting, then our line echoed.
        # Its input stays open until the echo is back (at end of input telnet quits).
        assert shutil.which("telnet"), "telnet is missing: ./scripts/test installs it"
        out = telnet_session(8008, b"ping\r\n", done=lambda out: "ping" in after_greeting(out))
        assert "hello from v" in out
        assert "ping" in after_greeting(out)
        proc.signal(signal.SIGINT)
        code, out, _ = proc.wait()
        assert code == 0
        assert "telnet localhost 8008" in out
        assert f"edit {temp}" in out  # the built-in config, copied there
    finally:
        proc.kill()
    assert not port_open(8008)
    assert list(temp.iterdir()) == []


def test_a_reader_that_goes_away_ends_the_output_quietly() -> None:
    """`tcpproxy ... | head -1`: the pipe closes before the output is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [*TCPPROXY, "check", "--config", str(REPO / "config" / "tcpproxy.yaml")],
            cwd=REPO,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=EXIT_S,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == 141
    assert done.stderr == ""
