"""The config limits as users meet them: `tcpproxy check` and `tcpproxy run` on hostile
files exit or carry on with one line naming the file, and signals are served throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.processes import EXIT_S, START_S, TCPPROXY, Process, http
from tests.harness import Client, config_yaml, free_port, listener_yaml, wait_until
from tests.unit.test_config_limits import alias_bomb

LIMIT = "(--max-config-size, TCPPROXY_MAX_CONFIG_SIZE)"


def check(path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [*TCPPROXY, "check", "--config", str(path), *flags],
        check=False,
        capture_output=True,
        text=True,
        timeout=EXIT_S,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stderr


def bomb(path: Path) -> None:
    path.write_bytes(alias_bomb(400))


def fifo(path: Path) -> None:
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (bomb, "too large: more than 200,000 nodes once YAML aliases are expanded"),
        (fifo, "is a named pipe (FIFO), expected a regular file"),
        (dev_zero, "is a character device, expected a regular file"),
    ],
    ids=["alias bomb", "FIFO", "symlink to /dev/zero"],
)
def test_check_refuses_a_hostile_file_in_one_line(
    tmp_path: Path, make: Callable[[Path], None], reason: str
) -> None:
    path = tmp_path / "tcpproxy.yaml"
    make(path)

    code, err = check(path)

    assert (code, err) == (1, f"{path}: {reason}\n")


def test_check_size_limit_from_the_flag_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("app", 8008, {"v1": ("10.0.0.1:9000", 1)})))
    path.write_text(path.read_text() + "#" * 2048 + "\n")

    assert check(path)[0] == 0
    assert check(path, "--max-config-size", "1KiB") == (
        1,
        f"{path}: file is larger than 1 KiB, the limit {LIMIT}\n",
    )
    assert check(path, env={"TCPPROXY_MAX_CONFIG_SIZE": "2000"}) == (
        1,
        f"{path}: file is larger than 2000 bytes, the limit {LIMIT}\n",
    )
    assert check(path, "--max-config-size", "lots")[0] == 2


def test_run_with_an_alias_bomb_exits_1_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    bomb(path)

    code, _, err = Process("run", "--config", str(path), "--admin", "off").wait()

    assert code == 1
    assert err.splitlines() == [
        f"{path}: too large: more than 200,000 nodes once YAML aliases are expanded"
    ]


def test_run_keeps_relaying_and_obeys_sigterm_when_its_config_becomes_a_fifo(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("app", port, {"v1": (echo_backends["v1"], 1)})))
    proc = Process(
        "run",
        "--config", str(path),
        "--admin", f"127.0.0.1:{admin}",
        "--max-config-size", "64KiB",
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

        def last_error() -> list[str]:
            return list(json.loads(http(f"http://127.0.0.1:{admin}/status")[1])["last_error"])

        # Over the size limit the flag set: rejected, the old config serving.
        big = tmp_path / "big.tmp"
        big.write_text("#" * (64 * 1024 + 1))
        big.replace(path)
        wait_until(
            lambda: last_error() == [f"{path}: file is larger than 64 KiB, the limit {LIMIT}"],
            what="the large file rejected",
        )
        # A FIFO renamed over the config: opening it would wait for a writer for ever.
        pipe = tmp_path / "pipe.tmp"
        os.mkfifo(pipe)
        pipe.replace(path)
        wait_until(
            lambda: last_error() == [f"{path}: is a named pipe (FIFO), expected a regular file"],
            what="the FIFO rejected",
        )
        assert held.echo(b"still relayed\n") == b"still relayed\n"

        proc.signal(signal.SIGTERM)
        held.close()
        code, _, err = proc.wait()
    finally:
        proc.kill()
    assert code == 0
    assert "Traceback" not in err
