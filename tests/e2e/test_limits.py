"""The process's limits, as a user meets them: the open files limit raised at start (and one
warning when it is still too low), and running out of local ports for real."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.processes import EXIT_S, REPO, START_S, port_open
from tests.harness import config_yaml, free_port, listener_yaml, wait_until

SOFT, HARD = 256, 4096


def limits_of(pid: int) -> tuple[int, int]:
    """(soft, hard) open files limit of a running process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


def run_with_limits(tmp_path: Path, max_connections: int) -> tuple[tuple[int, int], str]:
    """Start `tcpproxy run` with the open files limit at SOFT:HARD; return the limits it runs
    with once serving, and its log."""
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    backend = f"127.0.0.1:{free_port()}"
    path.write_text(
        config_yaml(listener_yaml("w", port, {"v1": (backend, 1)}, max_connections=max_connections))
    )
    proxy = subprocess.Popen(
        ["prlimit", f"--nofile={SOFT}:{HARD}", sys.executable, "-m", "tcpproxy", "run",
         "--config", str(path), "--admin", "off", "--no-access-log"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: port_open(port), timeout=START_S, what="proxy serving")
        limits = limits_of(proxy.pid)  # prlimit execs the proxy: the same process
    finally:
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=EXIT_S)
    assert proxy.returncode == 0, err
    return limits, err


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_the_open_files_limit_is_raised_to_the_hard_limit_and_a_short_one_is_named(
    tmp_path: Path,
) -> None:
    # 10,000 connections need 20,256 descriptors: 4,096 is too few, in one clear line.
    limits, err = run_with_limits(tmp_path, 10_000)
    assert limits == (HARD, HARD)
    warnings = [line for line in err.splitlines() if "open files limit" in line]
    assert len(warnings) == 1, err
    line = warnings[0]
    assert "WARNING" in line
    for number in ("4096", "10000", "20256"):
        assert re.search(rf"\b{number}\b", line), line
    assert "max_connections" in line
    assert "Traceback" not in err


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_no_warning_when_the_raised_limit_is_enough(tmp_path: Path) -> None:
    limits, err = run_with_limits(tmp_path, 1_000)  # 2,256 descriptors: fits in 4,096
    assert limits == (HARD, HARD)
    assert "open files limit" not in err, err


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return (
        subprocess.run(["unshare", "-n", "true"], check=False, capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -n (root) and ip")
def test_out_of_local_ports_ejects_no_backend_and_aborts_no_rollout(tmp_path: Path) -> None:
    """The report, for real: a network namespace with 50 local ports, more clients than
    that per backend. Before, this logged `failed: other`, ejected both backends and aborted
    the rollout for good."""
    script = (
        "ip link set lo up && "
        f'sysctl -q -w net.ipv4.ip_local_port_range="61000 {61000 + 49}" && '
        'exec "$0" -m tests.e2e.port_exhaustion "$1"'
    )
    run = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, sys.executable, str(tmp_path)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=4 * START_S,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    log = result["log"]
    # Each backend got its 50 ports' worth; the rest could not be connected.
    assert result["served"] == 100, (result["served"], log)
    assert result["refused"] == 40
    [listener] = result["status"]["listeners"]
    for backend in listener["backends"]:
        assert backend["ejected"] is False, backend
        assert backend["state"] != "unhealthy", backend
        assert sum(backend["connect_failures"].values()) == 0, backend
    assert listener["rollout"]["state"] == "running", listener["rollout"]
    assert "failed: other" not in log
    assert "Cannot assign requested address" in log
    assert "ejected" not in log
    assert "Traceback" not in log
