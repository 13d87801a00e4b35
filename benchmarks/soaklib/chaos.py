"""The soak's hands: backend processes, the proxy process, config writes, and the chaos loop.

Everything it does is recorded with a monotonic timestamp (backend kills, configs written and
confirmed, ports serving or not), so that the ledger can tell a legitimate close from a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcpbench.procs import Processes, Server, StartError

from soaklib.admin import Admin, AdminError
from soaklib.ledger import Applied, BackendEvent, PortEvent
from soaklib.routes import (
    AUX,
    BACKEND_NAMES,
    BAD_KINDS,
    ListenerSpec,
    RouteSpec,
    bad_file,
    mutate,
    render,
)

HOST = "127.0.0.1"
BENCHMARKS = Path(__file__).resolve().parents[1]
CONFIRM_TIMEOUT_S = 10.0
CONFIRM_POLL_S = 0.05
READY_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 5.0
MAX_CHAOS_ACTIONS = 100_000

# What the chaos loop does at each step, with relative weights.
ACTIONS: tuple[tuple[str, int], ...] = (
    ("change", 50),
    ("bad_file", 12),
    ("missing_file", 3),
    ("kill_backend", 12),
    ("restart_backend", 6),
    ("sighup", 10),
    ("admin_reload", 4),
    ("nothing", 3),
)


@dataclass
class Write:
    t: float
    serial: int
    kind: str  # good, bad:<kind>, missing
    method: str  # rename, symlink, inplace, unlink
    what: str
    sha256: str | None
    confirmed: bool = False
    t_confirmed: float | None = None
    note: str = ""

    def to_json(self, t0: float) -> dict[str, Any]:
        return {
            "t": round(self.t - t0, 3),
            "serial": self.serial,
            "kind": self.kind,
            "method": self.method,
            "what": self.what,
            "confirmed": self.confirmed,
            "confirm_s": None if self.t_confirmed is None else round(self.t_confirmed - self.t, 3),
            "note": self.note,
        }


@dataclass
class BackendProc:
    name: str
    port: int
    gen: int
    server: Server | None


@dataclass
class Controller:
    procs: Processes
    workdir: Path
    rng: random.Random
    say: Callable[[str], None]
    shutdown_timeout_s: float
    poll_interval_s: float
    ejection_s: float
    config_dir: Path = field(init=False)
    config_path: Path = field(init=False)
    admin_address: str = ""
    admin: Admin | None = None
    proxy: Server | None = None
    backends: dict[str, BackendProc] = field(default_factory=dict)
    spec: RouteSpec = field(default_factory=lambda: RouteSpec(()))
    good_text: str = ""
    serial: int = 0
    writes: list[Write] = field(default_factory=list)
    applied: list[Applied] = field(default_factory=list)
    ports: list[PortEvent] = field(default_factory=list)
    kills: list[BackendEvent] = field(default_factory=list)
    restarts: int = 0
    sighups: int = 0
    admin_reloads: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # harness or proxy misbehaviour seen
    status_mismatches: list[str] = field(default_factory=list)
    actions: dict[str, int] = field(default_factory=dict)
    serving: dict[str, int] = field(default_factory=dict)
    aux_ports: tuple[int, int] = (0, 0)
    aux_template: ListenerSpec | None = None
    # One backend unavailable at a time: down, or still ejected by the proxy after it is back
    # (passive ejection lasts `ejection_s` from the failed connects). Otherwise every backend
    # of a listener can be out at once and rejecting new connections would be legitimate.
    next_stop_at: float = 0.0

    def __post_init__(self) -> None:
        self.config_dir = self.workdir / "config"
        self.config_dir.mkdir()
        self.config_path = self.config_dir / "tcpproxy.yaml"

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def addresses(self) -> dict[str, str]:
        return {name: f"{HOST}:{b.port}" for name, b in self.backends.items()}

    # -- processes ---------------------------------------------------------------------------

    async def start_backend(self, name: str, port: int, gen: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "soaklib.backend",
            "--listen",
            f"{HOST}:{port}",
            "--name",
            name,
            "--gen",
            str(gen),
        ]
        env = {**os.environ, "PYTHONPATH": str(BENCHMARKS)}
        server = self.procs.start(f"backend-{name}", argv, env=env)
        self.backends[name] = BackendProc(name, port, gen, server)
        await wait_port(port, server, READY_TIMEOUT_S)

    async def stop_backend(self, name: str, sig: signal.Signals) -> None:
        """Kill (SIGKILL) or stop (SIGTERM) a backend's process and start the next one after
        a short outage: the connections pinned to it break, legitimately."""
        b = self.backends[name]
        assert b.server is not None
        kind = "kill" if sig == signal.SIGKILL else "term"
        self.kills.append(BackendEvent(self.now(), name, b.gen, kind))
        with contextlib.suppress(ProcessLookupError):
            os.kill(b.server.pid, sig)
        if not await wait_exit(b.server, EXIT_TIMEOUT_S):
            self.problems.append(f"backend {name} gen {b.gen} ignored {sig.name}")
        self.procs.stop(b.server.proc)
        b.server = None
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        await self.start_backend(name, b.port, b.gen + 1)
        self.restarts += 1
        self.next_stop_at = self.now() + self.ejection_s + 1.0

    async def start_proxy(self, admin_port: int) -> None:
        self.admin_address = f"{HOST}:{admin_port}"
        argv = [
            sys.executable,
            "-m",
            "tcpproxy",
            "run",
            "--config",
            str(self.config_path),
            "--admin",
            self.admin_address,
            "--log-format",
            "json",
            "--shutdown-timeout",
            f"{self.shutdown_timeout_s:g}s",
            "--poll-interval",
            f"{self.poll_interval_s:g}s",
        ]
        self.proxy = self.procs.start("proxy", argv)
        assert self.admin is not None
        deadline = self.now() + READY_TIMEOUT_S
        while not await self.admin.ready():
            if self.proxy.proc.poll() is not None:
                raise StartError(f"the proxy exited: {self.proxy.log_tail()}")
            if self.now() > deadline:
                raise StartError(f"the proxy is not ready after {READY_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.05)

    @property
    def proxy_pid(self) -> int:
        assert self.proxy is not None
        return self.proxy.pid

    def proxy_alive(self) -> bool:
        return self.proxy is not None and self.proxy.proc.poll() is None

    # -- config ------------------------------------------------------------------------------

    def initial(self, spec: RouteSpec, aux_ports: tuple[int, int]) -> None:
        """Write the first config (before the proxy starts)."""
        self.aux_ports = aux_ports
        self.aux_template = spec.get(AUX)
        self.spec = spec
        self.serial += 1
        self.good_text = render(spec, self.addresses(), self.serial)
        self._write_rename(self.good_text)

    def started(self) -> None:
        """The proxy is up with the initial config."""
        t = self.now()
        self.applied.append(Applied(t, t, self.spec))
        for lst in self.spec.listeners:
            self.ports.append(PortEvent(t, lst.port, True))
            self.serving[lst.name] = lst.port

    def _write_rename(self, text: str) -> None:
        # An editor's save: write a temporary file beside it, rename over.
        tmp = self.config_dir / ".tcpproxy.yaml.tmp"
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def _write_symlink(self, text: str) -> None:
        # A Kubernetes ConfigMap update: a new timestamped directory, the `..data` symlink
        # swapped to it by rename, the file itself a symlink through `..data`.
        d = self.config_dir
        target = d / f"..{self.serial}"
        target.mkdir()
        (target / "tcpproxy.yaml").write_text(text)
        tmp_link = d / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        tmp_link.symlink_to(target.name)
        tmp_link.replace(d / "..data")
        if not self.config_path.is_symlink():
            link = d / ".tcpproxy.yaml.link"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to("..data/tcpproxy.yaml")
            link.replace(self.config_path)
        self._prune_dirs(keep=target.name)

    def _prune_dirs(self, keep: str | None) -> None:
        for entry in self.config_dir.iterdir():
            is_dir = entry.is_dir() and not entry.is_symlink()
            if entry.name.startswith("..") and is_dir and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)
        if keep is None:
            with contextlib.suppress(FileNotFoundError):
                (self.config_dir / "..data").unlink()

    async def _write_inplace(self, text: str) -> None:
        # An editor that truncates and writes in place, slowly: the proxy may see an empty
        # or half file first (rejected), then the whole one. The cut is inside a quoted
        # string, so that the half is never a shorter valid config.
        cut = text.index('address: "') + len('address: "12')
        with self.config_path.open("w") as f:
            f.write(text[:cut])
            f.flush()
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))
            f.write(text[cut:])

    async def write_good(self, spec: RouteSpec, what: str, method: str | None = None) -> bool:
        if method is None:
            roll = self.rng.random()
            method = "rename" if roll < 0.7 else "symlink" if roll < 0.85 else "inplace"
        if method == "inplace" and self.config_path.is_symlink():
            method = "rename"
        self.serial += 1
        text = render(spec, self.addresses(), self.serial)
        sha = hashlib.sha256(text.encode()).hexdigest()
        # Ports that stop serving are marked before the write: a refused connection to them
        # from now on is legitimate. New ones count as serving once confirmed.
        t = self.now()
        new_ports = {lst.name: lst.port for lst in spec.listeners}
        for name, port in list(self.serving.items()):
            if new_ports.get(name) != port:
                del self.serving[name]
                self.ports.append(PortEvent(t, port, False))
        w = Write(t, self.serial, "good", method, what, sha)
        self.writes.append(w)
        if method == "rename":
            if self.config_path.is_symlink():
                self._write_rename(text)
                self._prune_dirs(keep=None)
            else:
                self._write_rename(text)
        elif method == "symlink":
            self._write_symlink(text)
        else:
            await self._write_inplace(text)
        ok = await self._confirm(w, lambda st: st.get("sha256") == sha, spec)
        if ok:
            self.spec = spec
            self.good_text = text
            assert w.t_confirmed is not None
            self.applied.append(Applied(w.t, w.t_confirmed, spec))
            for name, port in new_ports.items():
                if self.serving.get(name) != port:
                    self.serving[name] = port
                    self.ports.append(PortEvent(w.t_confirmed, port, True))
        return ok

    async def write_bad(self, kind: str) -> bool:
        self.serial += 1
        assert self.admin_address
        busy = int(self.admin_address.rsplit(":", 1)[1])
        text = bad_file(kind, self.good_text, self.serial, busy)
        sha = hashlib.sha256(text.encode()).hexdigest()
        method = "symlink" if self.rng.random() < 0.2 else "rename"
        w = Write(self.now(), self.serial, f"bad:{kind}", method, kind, sha)
        self.writes.append(w)
        if method == "symlink":
            self._write_symlink(text)
        elif self.config_path.is_symlink():
            self._write_rename(text)
            self._prune_dirs(keep=None)
        else:
            self._write_rename(text)
        applied_sha = hashlib.sha256(self.good_text.encode()).hexdigest()
        return await self._confirm(w, lambda st: _rejected(st, sha, applied_sha))

    async def write_missing(self) -> bool:
        """The file disappears for a moment (deleted, then written again)."""
        self.serial += 1
        w = Write(self.now(), self.serial, "missing", "unlink", "file removed", None)
        self.writes.append(w)
        self.config_path.unlink()
        self._prune_dirs(keep=None)
        applied_sha = hashlib.sha256(self.good_text.encode()).hexdigest()
        return await self._confirm(w, lambda st: _rejected(st, None, applied_sha))

    async def _confirm(
        self, w: Write, done: Callable[[dict[str, Any]], bool], spec: RouteSpec | None = None
    ) -> bool:
        assert self.admin is not None
        deadline = self.now() + CONFIRM_TIMEOUT_S
        while self.now() < deadline:
            try:
                st = await self.admin.status()
            except AdminError:
                await asyncio.sleep(CONFIRM_POLL_S)
                continue
            if done(st):
                w.confirmed = True
                w.t_confirmed = self.now()
                if spec is not None:
                    self._check_status(st, spec)
                return True
            await asyncio.sleep(CONFIRM_POLL_S)
        w.note = f"not confirmed within {CONFIRM_TIMEOUT_S:.0f}s"
        self.say(f"config write {w.serial} ({w.kind}: {w.what}) NOT confirmed")
        return False

    def _check_status(self, st: dict[str, Any], spec: RouteSpec) -> None:
        """/status must show exactly the written listeners and backends, with their weights;
        every other backend it lists must be draining."""
        listed = {lst["name"]: lst for lst in st.get("listeners", [])}
        for lst in spec.listeners:
            got = listed.get(lst.name)
            if got is None or got.get("state") != "serving":
                self.status_mismatches.append(f"listener {lst.name} missing or not serving")
                continue
            if got.get("bind") != f"{HOST}:{lst.port}":
                self.status_mismatches.append(f"listener {lst.name} bind {got.get('bind')}")
            want = dict(lst.backends)
            live = {b["name"]: b for b in got["backends"] if b["state"] != "draining"}
            if {n: b["weight"] for n, b in live.items()} != want:
                self.status_mismatches.append(
                    f"{lst.name}: status {sorted((n, b['weight']) for n, b in live.items())}"
                    f" != written {sorted(want.items())}"
                )
        for name, got in listed.items():
            if spec.get(name) is None and got.get("state") != "removed":
                self.status_mismatches.append(f"listener {name} should be removed")

    # -- chaos -------------------------------------------------------------------------------

    async def chaos(self, stop_at: float, interval_s: float) -> None:
        """Until `stop_at`: every ~interval, one random action (bounded in count too)."""
        names = [a for a, _ in ACTIONS]
        weights = [w for _, w in ACTIONS]
        for _ in range(MAX_CHAOS_ACTIONS):
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * interval_s)
            if self.now() >= stop_at or not self.proxy_alive():
                return
            action = self.rng.choices(names, weights)[0]
            self.actions[action] = self.actions.get(action, 0) + 1
            await self.act(action)

    async def act(self, action: str) -> None:
        assert self.aux_template is not None
        if action == "change":
            change = mutate(self.spec, self.rng, self.aux_ports, self.aux_template)
            await self.write_good(change.spec, change.what)
            if self.rng.random() < 0.2:
                self.sighup()  # races with the directory watch: must be harmless
        elif action == "bad_file":
            await self.write_bad(self.rng.choice(BAD_KINDS))
        elif action == "missing_file":
            await self.write_missing()
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            await self.write_good(self.spec, "restore after missing file", "rename")
        elif action in ("kill_backend", "restart_backend") and self.now() < self.next_stop_at:
            self.sighup()  # the previous one may still be ejected: not yet
        elif action in ("kill_backend", "restart_backend"):
            sig = signal.SIGKILL if action == "kill_backend" else signal.SIGTERM
            await self.stop_backend(self.rng.choice(BACKEND_NAMES), sig)
        elif action == "sighup":
            self.sighup()
        elif action == "admin_reload":
            assert self.admin is not None
            with contextlib.suppress(AdminError):
                code, _ = await self.admin.reload()
                self.admin_reloads.append(code)

    def sighup(self) -> None:
        if self.proxy_alive():
            os.kill(self.proxy_pid, signal.SIGHUP)
            self.sighups += 1

    async def restore(self, spec: RouteSpec) -> bool:
        """Back to the first config, so that the end state is comparable with the start."""
        return await self.write_good(spec, "restore the initial config", "rename")


def _rejected(st: dict[str, Any], sha: str | None, applied_sha: str) -> bool:
    last = st.get("last_reload") or {}
    return (
        last.get("result") == "failure"
        and last.get("sha256") == sha
        and st.get("sha256") == applied_sha
    )


async def wait_port(port: int, server: Server | None, timeout_s: float) -> None:
    """Until something accepts on the port (a fresh backend), or StartError."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (HOST, port))
            return
        except OSError:
            pass
        finally:
            sock.close()
        if server is not None and server.proc.poll() is not None:
            raise StartError(f"{server.name} exited: {server.log_tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"nothing listens on {HOST}:{port} after {timeout_s:.0f}s")
        await asyncio.sleep(0.05)


async def wait_exit(server: Server, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while server.proc.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
