"""Child processes: start on free loopback ports, wait until ready, measure RSS, clean up."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
# Only a server that never comes up waits this long: tcpproxy is an interpreter importing
# uvloop and pydantic, which takes over 10 s on a slow machine with its cores busy.
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
# Bounds for how many fds each server may use: at most the hard limit we can grant.
NOFILE_WANTED = 65536


class StartError(RuntimeError):
    """A server did not come up; the message is one line for the user."""


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks; we release it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def listen_port() -> int:
    """A free port below the kernel's ephemeral range, for a listener that is closed and
    bound again later: a port from free_port() may meanwhile become some connection's
    local port, and the bind then fails."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return free_port()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    return free_port()


def nofile_limit() -> int:
    """The open-files limit children get: the hard limit (root may not raise it in a sandbox)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return NOFILE_WANTED
    return int(hard)


def raise_nofile() -> int:
    """Raise our soft open-files limit to the hard one; every child inherits it."""
    limit = nofile_limit()
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return limit


class Processes:
    """Every child we start, so that one `stop_all` ends them, on any exit path."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Server:
        log_path = self.log_dir / f"{name}.{len(self._procs)}.log"
        log = log_path.open("wb")
        try:
            # Own session: a Ctrl-C in the terminal reaches only us, and we stop the children
            # in order (an nginx master killed first would orphan its worker).
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        finally:
            log.close()
        self._procs.append((name, proc))
        return Server(name, proc, log_path, self)

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, up to grace_s to exit, then SIGKILL to its whole process group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        # Whatever is left in the child's own process group (e.g. an nginx worker) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self._procs)):
            self.stop(proc)


class Server:
    """A started child process listening on one or more loopback ports."""

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], log_path: Path, owner: Processes
    ) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._owner = owner

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait_ready(self, ports: Sequence[int], timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until every port accepts; StartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if self.proc.poll() is not None:
                raise StartError(
                    f"{self.name} exited with code {self.proc.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise StartError(
                    f"{self.name} not listening after {timeout:.0f}s: {self.log_tail()}"
                )
            try:
                with socket.create_connection((HOST, pending[0]), timeout=0.5):
                    pending.pop(0)
            except OSError:
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its descendants so far."""
        return sum(_cpu_ticks(pid) for pid in _tree(self.pid)) / _CLK_TCK

    def rss_kib(self) -> int:
        """VmRSS of the process and all its descendants (nginx master + worker)."""
        return sum(vmrss_kib(pid) for pid in _tree(self.pid))

    def pids(self) -> list[int]:
        """The process and all its descendants."""
        return _tree(self.pid)

    def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        self._owner.stop(self.proc, grace_s)


def vmrss_kib(pid: int) -> int:
    """VmRSS of one process in KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def _cpu_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return int(fields[11]) + int(fields[12]) if len(fields) > 12 else 0


def _tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if len(fields) > 1:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out = [root]
    queue = [root]
    while queue:
        for child in parents.get(queue.pop(), []):
            out.append(child)
            queue.append(child)
    return out


def run_checked(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a client tool to completion in its own session, killed if it overruns."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
