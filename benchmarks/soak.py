"""Soak test: mixed traffic through a real tcpproxy process while its world keeps changing.

    python benchmarks/soak.py [--quick] [--duration SECONDS] [--json PATH] [--png PATH]

For the duration (default 10 minutes; `--quick` about a minute in all) it drives long-lived
echo streams, bulk uploads and downloads, short request/response connections at a steady
rate, slow readers, clients that reset and idle connections through the proxy, checking every
byte, and three hostile patterns on two listeners with a short idle timeout (slow readers
that must not be closed as idle, and stalled ones that must be reset; early replies followed
by a backend's reset; resets after half-closes, from either side); meanwhile it rewrites
the route config (weights, backends removed and re-added, the second listener removed,
re-added and moved, a bad or missing file now and then), kills and restarts backends, and
sends SIGHUP. Then it stops the proxy with SIGTERM and reports:
connections by cause, bytes relayed and verified, lost and corrupted bytes, unexpected
closes, reloads, the proxy's RSS and fd count over time, and a verdict. See the README's
"Soak test" section, benchmarks/README.md, and soaklib/ledger.py for what counts as a
legitimate close.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from soaklib import report
from soaklib.admin import (
    Admin,
    AdminError,
    Samples,
    describe_fds,
    fd_kinds,
    fd_targets,
    metric_sum,
    threads,
)
from soaklib.chaos import Controller, wait_exit
from soaklib.clients import HOSTILE_VARIANTS, Load, LoadParams
from soaklib.ledger import (
    EXPECTED_CAUSES,
    HOSTILE_PASSES,
    Facts,
    ProxyLog,
    Verdicts,
    classify,
)
from soaklib.report import Check
from soaklib.routes import (
    AUX,
    BACKEND_NAMES,
    HOSTILE_BACKENDS,
    MAIN,
    TIGHT,
    ListenerSpec,
    RouteSpec,
)
from tcpbench.peers import machine_info
from tcpbench.procs import Processes, StartError, listen_port, raise_nofile, vmrss_kib

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 1024 * 1024
GIT_TIMEOUT_S = 5.0
LOG_TAIL_S = 0.25
REST_WAIT_S = 30.0  # for the proxy to have no connection left once the clients are done
FD_SETTLE_S = 5.0
REPORT_LIMIT = 50  # details kept per list in the JSON
PIPE_POOL_MAX = 64  # tcpproxy.splice keeps at most this many idle pipes
# Counters that must never go down while their series exists (Prometheus reads a decrease as
# a restart, and rate() spikes).
MONOTONIC = (
    "tcpproxy_connections_total",
    "tcpproxy_bytes_total",
    "tcpproxy_backend_connect_failures_total",
    "tcpproxy_drain_closed_connections_total",
    "tcpproxy_config_reloads_total",
    "tcpproxy_connections_rejected_total",
    "tcpproxy_connection_duration_seconds_count",
)
# The hostile patterns' checks: (name, kind, variants). Each must have run, and gone right at
# least once, on every TIGHT listener, with no illegitimate end.
HOSTILE_CHECKS = (
    (
        "slow readers under a 2 s idle timeout: every byte, never closed as idle",
        "slowidle",
        ("reading",),
    ),
    (
        "stalled readers: closed by the idle timeout with a reset, not a clean EOF",
        "slowidle",
        ("stall",),
    ),
    ("early reply, then the backend's reset: whole reply before the reset", "early", ("upload",)),
    (
        "client's reset after its half-close: noticed at once (end client_reset)",
        "hcreset",
        ("client_now", "client_ack"),
    ),
    (
        "backend's reset after its half-close: answer, then the reset to the client",
        "hcreset",
        ("backend",),
    ),
)


@dataclass(frozen=True)
class Mode:
    name: str
    duration_s: float
    warmup_s: float
    sample_s: float
    chaos_interval_s: float
    main_drain_s: float
    aux_drain_s: float
    main_idle_s: float
    tight_idle_s: float  # the TIGHT listeners' (hostile patterns)
    shutdown_timeout_s: float
    poll_interval_s: float
    ejection_s: float
    held_at_shutdown: int
    rss_gating: bool  # a minute is too short to call RSS flat or not; ten minutes is not
    load: LoadParams

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.__dict__.items() if k != "load"}
        return {**doc, "load": self.load.to_json()}


FULL = Mode(
    name="full",
    duration_s=600,
    warmup_s=60,
    sample_s=2.0,
    chaos_interval_s=3.0,
    main_drain_s=20,
    aux_drain_s=8,
    main_idle_s=15,
    tight_idle_s=2,
    shutdown_timeout_s=2,
    poll_interval_s=5,
    ejection_s=5,
    held_at_shutdown=6,
    rss_gating=True,
    load=LoadParams(
        stream_concurrency=16,
        stream_life_s=(5, 60),
        stream_chunk_max=32 * 1024,
        stream_gap_s=0.025,
        bulk_concurrency=1,
        bulk_bytes=(8 * MiB, 64 * MiB),
        rr_rate=20,
        rr_cap=64,
        rr_payload_max=64 * 1024,
        slow_concurrency=3,
        slow_bytes=(1 * MiB, 6 * MiB),
        slow_read_bytes=16 * 1024,
        slow_tick_s=0.05,
        slow_stall_s=3.0,
        reset_rate=2,
        idle_concurrency=12,
        idle_long_fraction=0.4,
        aux_share=0.3,
        slowidle_concurrency=3,
        slowidle_life_s=(5, 30),
        slowidle_tick_s=(0.01, 0.05),
        early_rate=1,
        early_read_max=256 * 1024,
        early_reply_max=16 * 1024,
        hcreset_rate=1.5,
        hcreset_bytes_max=64 * 1024,
    ),
)
QUICK = Mode(
    name="quick",
    duration_s=40,
    warmup_s=10,
    sample_s=1.0,
    chaos_interval_s=1.2,
    main_drain_s=5,
    aux_drain_s=3,
    main_idle_s=3,
    tight_idle_s=2,
    shutdown_timeout_s=1,
    poll_interval_s=2,
    ejection_s=2,
    held_at_shutdown=4,
    rss_gating=False,
    load=replace(
        FULL.load,
        stream_concurrency=8,
        stream_life_s=(2, 12),
        bulk_bytes=(2 * MiB, 16 * MiB),
        rr_rate=15,
        slow_concurrency=2,
        slow_bytes=(256 * 1024, 2 * MiB),
        slow_stall_s=0.8,
        idle_concurrency=6,
        slowidle_concurrency=3,
        slowidle_life_s=(2, 6),
        early_rate=2,
        hcreset_rate=3,
    ),
)


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak tcpproxy with mixed traffic, config churn and backend kills.",
    )
    p.add_argument("--quick", action="store_true", help="about a minute in all, for checks")
    p.add_argument("--duration", type=float, help="seconds of load (default 600; 40 with --quick)")
    p.add_argument(
        "--engine",
        choices=("copy", "splice", "mixed"),
        default="mixed",
        help="relay engine of the listeners; mixed (default): main copy, aux splice",
    )
    p.add_argument("--seed", type=int, help="random seed (default: from the clock; printed)")
    p.add_argument(
        "--json",
        type=Path,
        help="JSON summary (default results/soak-latest.json, soak-quick.json with --quick)",
    )
    p.add_argument("--png", type=Path, help="PNG plot (default next to the JSON's default)")
    p.add_argument("--keep-logs", type=Path, help="copy the proxy's and backends' logs here")
    return p.parse_args(argv)


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            ["git", "-C", str(HERE.parent), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_commit() -> str:
    """The commit measured, and whether tcpproxy/ differed from it (read-only git)."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0:
        return "unknown"
    dirty = _git("diff", "--quiet", "HEAD", "--", "tcpproxy")
    changed = dirty is not None and dirty.returncode == 1
    return head.stdout.strip() + (" + uncommitted changes in tcpproxy/" if changed else "")


class Soak:
    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        self.args = args
        mode = QUICK if args.quick else FULL
        if args.duration is not None:
            mode = replace(
                mode,
                duration_s=args.duration,
                warmup_s=min(mode.warmup_s, args.duration / 4),
            )
        self.mode = mode
        self.seed = args.seed if args.seed is not None else int(time.time() * 1000) % 10**9
        self.rng = random.Random(self.seed)
        self.progress = Progress()
        self.say = self.progress.say
        self.procs = procs
        self.workdir = workdir
        self.ctl = Controller(
            procs,
            workdir,
            self.rng,
            self.say,
            mode.shutdown_timeout_s,
            mode.poll_interval_s,
            mode.ejection_s,
        )
        self.log = ProxyLog()
        self.samples: list[list[float]] = []
        self.decreases: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.wall_offset = time.time() - time.monotonic()
        self.harness: list[str] = []  # problems of the soak itself, not of the proxy
        self.proxy_died: str | None = None
        self.load = Load(
            mode.load,
            self.rng,
            lambda: dict(self.ctl.serving),
            mode.main_idle_s,
            logged=lambda listener, client, since, closed_after: self.log.ended(
                listener,
                client,
                since + self.wall_offset,
                None if closed_after is None else closed_after + self.wall_offset,
            ),
        )
        self.t_load = self.t0
        self.t_sigterm: float | None = None
        self.fds_at_start: dict[str, str] = {}
        self.extra_fds: list[str] = []  # what the proxy holds at rest that it did not at first

    # -- watching the proxy ------------------------------------------------------------------

    async def tail_log(self, stop: asyncio.Event) -> None:
        """Feed the proxy's stderr (a file: the proxy never waits for us) to the ledger."""
        assert self.ctl.proxy is not None
        path = self.ctl.proxy.log_path
        with path.open("rb") as f:
            while True:  # ends with `stop`, after one last read
                chunk = f.read()
                if chunk:
                    self.log.feed(chunk.decode(errors="replace"))
                if stop.is_set():
                    rest = f.read()
                    if rest:
                        self.log.feed(rest.decode(errors="replace"))
                    self.log.finish()
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), LOG_TAIL_S)

    async def sample(self, admin: Admin, prev: Samples | None) -> Samples | None:
        pid = self.ctl.proxy_pid
        kinds = fd_kinds(fd_targets(pid))
        rss = vmrss_kib(pid)
        try:
            status = await admin.status()
            metrics = await admin.metrics()
        except AdminError as exc:
            self.harness.append(f"sample: {exc}")
            return prev
        open_conns = sum(lst["open_connections"] for lst in status["listeners"])
        assert self.ctl.proxy is not None
        cpu = self.ctl.proxy.cpu_seconds()
        t = time.monotonic() - self.t0
        self.samples.append(
            [
                round(t, 2),
                rss,
                kinds["fds"],
                open_conns,
                round(cpu, 2),
                threads(pid),
                kinds["sockets"],
                kinds["pipes"],
            ]
        )
        if prev is not None:
            for key, value in metrics.items():
                if key[0] in MONOTONIC and key in prev and value < prev[key] - 1e-9:
                    self.decreases.append(
                        {"t": round(t, 1), "series": _series(key), "from": prev[key], "to": value}
                    )
        return metrics

    async def monitor(self, admin: Admin, stop: asyncio.Event) -> None:
        prev: Samples | None = None
        last_say = 0.0
        while not stop.is_set():  # one sample per interval, for the run's duration
            if not self.ctl.proxy_alive():
                assert self.ctl.proxy is not None
                self.proxy_died = (
                    f"the proxy exited (code {self.ctl.proxy.proc.returncode}) during the run: "
                    f"{self.ctl.proxy.log_tail(3)}"
                )
                self.say(self.proxy_died)
                return
            prev = await self.sample(admin, prev)
            now = time.monotonic() - self.t0
            if now - last_say >= 15 and self.samples:
                last_say = now
                s = self.samples[-1]
                self.say(
                    f"RSS {s[1] / 1024:.1f} MiB, {s[2]} fds, {s[3]} open connections; "
                    f"{len(self.load.records)} connections so far, "
                    f"{len(self.ctl.writes)} config writes, {len(self.ctl.kills)} backend "
                    f"kills, {len(self.log.access)} access-log lines"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.mode.sample_s)

    async def at_rest(self, admin: Admin, baseline: dict[str, int] | None) -> dict[str, int]:
        """The proxy's RSS and fds with no connection open (waits for that, bounded)."""
        deadline = time.monotonic() + REST_WAIT_S
        open_conns = -1
        while time.monotonic() < deadline:
            try:
                status = await admin.status()
            except AdminError:
                await asyncio.sleep(0.2)
                continue
            open_conns = sum(lst["open_connections"] for lst in status["listeners"])
            if open_conns == 0:
                break
            await asyncio.sleep(0.2)
        # Let closed sockets and the connections of our own admin requests go: the fewest
        # sockets seen over a short while (until the start's count, at the end).
        pid = self.ctl.proxy_pid
        targets = fd_targets(pid)
        settle = time.monotonic() + (FD_SETTLE_S if baseline is not None else 0.5)
        while time.monotonic() < settle:
            if baseline is not None and fd_kinds(targets)["sockets"] <= baseline["sockets"]:
                break
            await asyncio.sleep(0.1)
            again = fd_targets(pid)
            if fd_kinds(again)["sockets"] < fd_kinds(targets)["sockets"]:
                targets = again
        if baseline is None:
            self.fds_at_start = targets
        else:
            known = set(self.fds_at_start.values())
            extra = {fd: t for fd, t in targets.items() if t not in known}
            self.extra_fds = describe_fds(pid, extra)
        return {"rss_kib": vmrss_kib(pid), **fd_kinds(targets), "open_connections": open_conns}

    # -- the run -----------------------------------------------------------------------------

    def initial_spec(self, ports: dict[str, int]) -> RouteSpec:
        m = self.mode
        engine = self.args.engine
        main = ListenerSpec(
            MAIN,
            ports[MAIN],
            (("b1", 5), ("b2", 3), ("b3", 2)),
            m.main_drain_s,
            m.main_idle_s,
            engine="copy" if engine == "mixed" else engine,
            ejection_s=m.ejection_s,
        )
        aux = ListenerSpec(
            AUX,
            ports[AUX],
            (("b3", 1), ("b4", 1)),
            m.aux_drain_s,
            3600,
            engine="splice" if engine == "mixed" else engine,
            ejection_s=m.ejection_s,
        )
        tight = tuple(
            ListenerSpec(
                name,
                ports[name],
                tuple((b, 1) for b in HOSTILE_BACKENDS),
                m.aux_drain_s,
                m.tight_idle_s,
                engine=lst.engine,
                ejection_s=m.ejection_s,
            )
            for name, lst in zip(TIGHT, (main, aux), strict=True)
        )
        return RouteSpec((main, aux, *tight))

    async def run(self) -> dict[str, Any]:
        m = self.mode
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        raise_nofile()
        self.say(
            f"soak ({m.name}): {m.duration_s:.0f}s of load, seed {self.seed}, "
            f"workdir {self.workdir}"
        )
        ports = {MAIN: listen_port(), AUX: listen_port(), "aux2": listen_port()}
        ports.update({name: listen_port() for name in TIGHT})
        for name in (*BACKEND_NAMES, *HOSTILE_BACKENDS):
            await self.ctl.start_backend(name, listen_port(), 1)
            self.say(f"backend {name} on :{self.ctl.backends[name].port}")
        spec = self.initial_spec(ports)
        self.ctl.initial(spec, (ports[AUX], ports["aux2"]))
        admin_port = listen_port()
        async with Admin(f"127.0.0.1:{admin_port}") as admin:
            self.ctl.admin = admin
            await self.ctl.start_proxy(admin_port)
            self.ctl.started()
            self.say(
                f"proxy pid {self.ctl.proxy_pid}: main :{ports[MAIN]}, aux :{ports[AUX]} "
                f"(moves to :{ports['aux2']}), admin :{admin_port}"
            )
            metrics0 = await admin.metrics()
            await asyncio.sleep(0.5)
            rest0 = await self.at_rest(admin, None)
            self.say(f"at rest before the load: {rest0}")
            stop_tail, stop_monitor = asyncio.Event(), asyncio.Event()
            tail = asyncio.get_running_loop().create_task(self.tail_log(stop_tail))
            monitor = asyncio.get_running_loop().create_task(self.monitor(admin, stop_monitor))
            self.t_load = time.monotonic()
            stop_at = self.t_load + m.duration_s
            await self.drive(stop_at)
            left = await self.load.wait_all(self.budget_max())
            if left:
                self.harness.append(f"{left} clients had not ended after their budgets")
            self.say(f"load done: {len(self.load.records)} connections")
            restored = self.ctl.proxy_alive() and await self.ctl.restore(spec)
            if not restored:
                self.harness.append("could not restore the initial config at the end")
            stop_monitor.set()
            await monitor
            rest1: dict[str, int] | None = None
            shutdown: dict[str, Any] = {}
            if self.ctl.proxy_alive():
                rest1 = await self.at_rest(admin, rest0)
                self.say(f"at rest after the load: {rest1}")
                metrics1 = await admin.metrics()
                shutdown = await self.shutdown()
            else:
                metrics1 = metrics0
            stop_tail.set()
            await tail
        for name in list(self.ctl.backends):
            b = self.ctl.backends[name]
            if b.server is not None:
                self.procs.stop(b.server.proc)
        self.harness += _backend_trouble(self.workdir)
        if self.args.keep_logs:
            self.args.keep_logs.mkdir(parents=True, exist_ok=True)
            for f in self.workdir.glob("*.log"):
                shutil.copy(f, self.args.keep_logs / f.name)
        return self.build_report(
            started_at,
            metrics0=metrics0,
            metrics1=metrics1,
            rest0=rest0,
            rest1=rest1,
            shutdown=shutdown,
        )

    def budget_max(self) -> float:
        p = self.mode.load
        slow_s = p.slow_bytes[1] / (p.slow_read_bytes / p.slow_tick_s)
        return max(
            p.stream_life_s[1] + 30,
            120,
            2 * slow_s + 30,
            2 * self.mode.main_idle_s + 20,
            self.slowidle_budget(),
        )

    def slowidle_budget(self) -> float:
        return 3 * self.mode.load.slowidle_life_s[1] + 10 * self.mode.tight_idle_s + 30

    async def drive(self, stop_at: float) -> None:
        m, load = self.mode, self.load
        p = m.load
        slow_s = p.slow_bytes[1] / (p.slow_read_bytes / p.slow_tick_s)
        jobs = [
            load.keep(
                "stream",
                p.stream_concurrency,
                load.stream(stop_at),
                p.stream_life_s[1] + 30,
                stop_at,
            ),
            load.keep("bulk", p.bulk_concurrency, load.bulk(), 120, stop_at),
            load.at_rate(
                "request", p.rr_rate, load.request(), cap=p.rr_cap, budget_s=30, stop_at=stop_at
            ),
            load.keep("slow", p.slow_concurrency, load.slow(), 2 * slow_s + 30, stop_at),
            load.at_rate(
                "reset", p.reset_rate, load.resetter(), cap=p.rr_cap, budget_s=30, stop_at=stop_at
            ),
            load.keep("idle", p.idle_concurrency, load.idle(), 2 * m.main_idle_s + 20, stop_at),
            load.keep(
                "slowidle", p.slowidle_concurrency, load.slowidle(), self.slowidle_budget(), stop_at
            ),
            load.at_rate(
                "early", p.early_rate, load.early(), cap=p.rr_cap, budget_s=30, stop_at=stop_at
            ),
            load.at_rate(
                "hcreset",
                p.hcreset_rate,
                load.hcreset(),
                cap=p.rr_cap,
                budget_s=30,
                stop_at=stop_at,
            ),
            self.ctl.chaos(stop_at - 2 * m.chaos_interval_s, m.chaos_interval_s),
        ]
        tasks = [asyncio.get_running_loop().create_task(j) for j in jobs]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def shutdown(self) -> dict[str, Any]:
        """Hold a few connections open, SIGTERM the proxy: they must be closed at the
        shutdown timeout (end reason `shutdown`) and the proxy must exit 0."""
        m = self.mode
        held = [
            self.load.start("shutdown", self.load.held(), m.shutdown_timeout_s + 30)
            for _ in range(m.held_at_shutdown)
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                for _ in held:
                    await self.load.held_ready.get()
        assert self.ctl.proxy is not None
        self.t_sigterm = time.monotonic()
        os.kill(self.ctl.proxy_pid, signal.SIGTERM)
        exited = await wait_exit(self.ctl.proxy, m.shutdown_timeout_s + 10)
        took = time.monotonic() - self.t_sigterm
        await asyncio.wait([t for t in held if t is not None], timeout=10)
        code = self.ctl.proxy.proc.returncode if exited else None
        self.say(f"SIGTERM: proxy exited with {code} after {took:.2f}s")
        return {
            "held_connections": len([t for t in held if t is not None]),
            "exit_code": code,
            "exit_s": round(took, 3),
            "limit_s": m.shutdown_timeout_s + 5,
        }

    # -- the report --------------------------------------------------------------------------

    def build_report(
        self,
        started_at: str,
        *,
        metrics0: Samples,
        metrics1: Samples,
        rest0: dict[str, int],
        rest1: dict[str, int] | None,
        shutdown: dict[str, Any],
    ) -> dict[str, Any]:
        m, ctl, load = self.mode, self.ctl, self.load
        facts = Facts(
            records=load.records,
            log=self.log,
            kills=ctl.kills,
            applied=ctl.applied,
            ports=ctl.ports,
            t_sigterm=self.t_sigterm,
            wall_offset=self.wall_offset,
            t0=self.t0,
        )
        v = classify(facts)
        unexpected = len(v.unexpected)
        good = [w for w in ctl.writes if w.kind == "good"]
        bad = [w for w in ctl.writes if w.kind != "good"]
        applied = metric_sum(metrics1, "tcpproxy_config_reloads_total", result="success") - (
            metric_sum(metrics0, "tcpproxy_config_reloads_total", result="success")
        )
        rejected = metric_sum(metrics1, "tcpproxy_config_reloads_total", result="failure") - (
            metric_sum(metrics0, "tcpproxy_config_reloads_total", result="failure")
        )
        res = report.resources(self.samples, m.warmup_s + (self.t_load - self.t0), rest0, rest1)
        kinds = Counter(r.kind for r in load.records)
        completed = {k: c.get("completed", 0) for k, c in v.causes_by_kind.items()}
        doc: dict[str, Any] = {
            "schema": report.SCHEMA,
            "mode": m.name,
            "started_at": started_at,
            "duration_s": m.duration_s,
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
            "seed": self.seed,
            "engines": {lst.name: lst.engine for lst in self.ctl.spec.listeners},
            "machine": machine_info(),
            "tcpproxy_commit": _git_commit(),
            "params": m.to_json(),
            "connections": {
                "opened": len(load.records),
                "opened_by_kind": dict(kinds.most_common()),
                "closed_by_cause": dict(v.causes.most_common()),
                "closed_by_cause_by_kind": {
                    k: dict(c.most_common()) for k, c in sorted(v.causes_by_kind.items())
                },
                "client_outcomes": dict(v.outcomes.most_common()),
                "proxy_end_reasons": dict(v.proxy_ends.most_common()),
                "not_started": load.skipped,
                "unexpected_closes": unexpected,
                "unexpected": v.unexpected[:REPORT_LIMIT],
                "misrouted": v.misrouted[:REPORT_LIMIT],
                "byte_count_mismatches": v.byte_mismatches[:REPORT_LIMIT],
                "unmatched_log_lines": v.unmatched_log_lines[:REPORT_LIMIT],
                "log_lines_without_client_address": v.lines_without_client_address,
            },
            "hostile": {k: dict(c.most_common()) for k, c in sorted(v.hostile.items())},
            "bytes": {
                "relayed_up": v.relayed_up,
                "relayed_down": v.relayed_down,
                "expected": v.expected_bytes,
                "verified": v.verified_bytes,
                "lost": v.lost_bytes,
                "corrupted": v.corrupted_bytes,
                "in_flight_on_broken": v.broken_in_flight_bytes,
            },
            "reloads": {
                "good_writes": len(good),
                "bad_writes": len(bad),
                "writes_by_kind": dict(Counter(w.kind for w in ctl.writes).most_common()),
                "writes_by_method": dict(Counter(w.method for w in ctl.writes).most_common()),
                "applied_confirmed": sum(1 for w in good if w.confirmed),
                "rejected_confirmed": sum(1 for w in bad if w.confirmed),
                "applied": int(applied),
                "rejected": int(rejected),
                "log_lines_applied": self.log.applied,
                "log_lines_rejected": self.log.rejections,
                "sighups": ctl.sighups,
                "admin_reloads": len(ctl.admin_reloads),
                "admin_reload_codes": dict(Counter(ctl.admin_reloads)),
                "status_mismatches": ctl.status_mismatches[:REPORT_LIMIT],
                "writes": [w.to_json(self.t0) for w in ctl.writes],
            },
            "backends": {
                "kills": sum(1 for k in ctl.kills if k.kind == "kill"),
                "terms": sum(1 for k in ctl.kills if k.kind == "term"),
                "kill_times_s": [round(k.t - self.t0, 2) for k in ctl.kills],
                "events": [
                    {"t": round(k.t - self.t0, 2), "backend": k.name, "gen": k.gen, "kind": k.kind}
                    for k in ctl.kills
                ],
            },
            "chaos_actions": ctl.actions,
            "proxy": {
                "errors": self.log.errors[:REPORT_LIMIT],
                "error_count": len(self.log.errors),
                "connect_failures": dict(self.log.connect_failures),
                "ejections": dict(self.log.ejections),
                "other_warnings": dict(self.log.warnings.most_common(20)),
                "log_lines": self.log.lines,
                "counter_decreases": self.decreases[:REPORT_LIMIT],
                "extra_fds_at_rest": self.extra_fds[:REPORT_LIMIT],
                "died": self.proxy_died,
                "shutdown": shutdown,
                "admin_requests": ctl.admin.requests if ctl.admin else 0,
                "admin_errors": (ctl.admin.errors if ctl.admin else [])[:REPORT_LIMIT],
            },
            "harness_problems": self.harness + ctl.problems,
            "resources": {
                "columns": [
                    "t_s",
                    "rss_kib",
                    "fds",
                    "open_connections",
                    "cpu_s",
                    "threads",
                    "sockets",
                    "pipes",
                ],
                "samples": self.samples,
                "summary": res,
            },
        }
        checks = self.checks(doc, completed, rest0, rest1)
        checks[3:3] = hostile_checks(v)
        doc["checks"] = [c.to_json() for c in checks]
        doc["verdict"] = report.verdict(checks)
        return doc

    def checks(
        self,
        doc: dict[str, Any],
        completed: dict[str, int],
        rest0: dict[str, int],
        rest1: dict[str, int] | None,
    ) -> list[Check]:
        m = self.mode
        c, b, r, p = doc["connections"], doc["bytes"], doc["reloads"], doc["proxy"]
        s = doc["resources"]["summary"]
        rss, fds = s["rss_kib"], s["fds"]
        sd = p["shutdown"]
        out = [
            Check("lost bytes", b["lost"] == 0, b["lost"], "0"),
            Check("corrupted bytes", b["corrupted"] == 0, b["corrupted"], "0"),
            Check(
                "unexpected closes",
                c["unexpected_closes"] == 0,
                c["unexpected_closes"],
                "0",
                note="closed other than by drain deadline, idle timeout, shutdown, a killed "
                "backend or the client",
            ),
            Check("proxy error log lines", p["error_count"] == 0, p["error_count"], "0"),
            Check("proxy alive until SIGTERM", p["died"] is None, p["died"] or "yes", "yes"),
            Check(
                "exit after SIGTERM",
                sd.get("exit_code") == 0 and sd.get("exit_s", 1e9) <= sd.get("limit_s", 0),
                f"code {sd.get('exit_code')} after {sd.get('exit_s')}s",
                f"code 0 within {sd.get('limit_s')}s",
            ),
            Check("misrouted new connections", not c["misrouted"], len(c["misrouted"]), "0"),
            Check(
                "proxy byte counts = client byte counts",
                not c["byte_count_mismatches"],
                len(c["byte_count_mismatches"]),
                "0 mismatches",
            ),
            Check(
                "access-log lines without a client (or clients without one)",
                not c["unmatched_log_lines"],
                len(c["unmatched_log_lines"]),
                "0",
            ),
            Check(
                "good config writes applied",
                r["applied_confirmed"] == r["good_writes"] == r["applied"],
                f"{r['applied_confirmed']} confirmed, {r['applied']} counted, "
                f"of {r['good_writes']}",
                "all, each counted once",
            ),
            Check(
                "bad config writes rejected",
                r["rejected_confirmed"] == r["bad_writes"] and r["rejected"] >= r["bad_writes"],
                f"{r['rejected_confirmed']} confirmed, {r['rejected']} counted, "
                f"of {r['bad_writes']}",
                "all",
            ),
            Check(
                "access-log lines without the client's address",
                not c["log_lines_without_client_address"],
                c["log_lines_without_client_address"],
                "0",
                gating=False,
                note="the proxy did not learn the address of a client that reset at once",
            ),
            Check(
                "/status = written config",
                not r["status_mismatches"],
                len(r["status_mismatches"]),
                "0",
            ),
            Check(
                "counters never decrease",
                not p["counter_decreases"],
                len(p["counter_decreases"]),
                "0",
            ),
            Check(
                "connections left in the proxy at the end",
                rest1 is not None and rest1["open_connections"] == 0,
                None if rest1 is None else rest1["open_connections"],
                "0",
            ),
            Check(
                "fds at rest, end vs start (sockets + other)",
                rest1 is not None
                and rest1["sockets"] <= rest0["sockets"]
                and rest1["other"] <= rest0["other"],
                None
                if rest1 is None
                else f"sockets {rest0['sockets']} -> {rest1['sockets']}, "
                f"other {rest0['other']} -> {rest1['other']}",
                "no more than at the start",
                note="; ".join(p["extra_fds_at_rest"][:4]),
            ),
            Check(
                "idle pipes at rest (splice pool)",
                rest1 is not None and rest1["pipes"] <= 2 * PIPE_POOL_MAX,
                None if rest1 is None else rest1["pipes"],
                f"<= {2 * PIPE_POOL_MAX} fds (pool of {PIPE_POOL_MAX} pipes)",
            ),
            Check(
                "sockets - 2 x connections, growth after warm-up",
                fds["residual_growth"] is not None
                and abs(fds["residual_growth"]) <= report.FD_RESIDUAL_TOLERANCE,
                fds["residual_growth"],
                f"<= {report.FD_RESIDUAL_TOLERANCE}",
            ),
        ]
        growth = rss["growth_after_warmup"]
        limit = report.rss_limit_kib(rss["after_warmup_median"] or 0)
        out.append(
            Check(
                "RSS growth after warm-up (KiB)",
                growth is not None and growth <= limit,
                growth,
                f"<= {limit:.0f}",
                gating=m.rss_gating,
                note="" if m.rss_gating else "informational in --quick: too short to judge",
            )
        )
        out.append(
            Check(
                "soak harness problems",
                not doc["harness_problems"],
                len(doc["harness_problems"]),
                "0",
                note="; ".join(doc["harness_problems"][:3]),
            )
        )
        missing = [k for k in ("stream", "bulk", "request", "slow", "idle") if not completed.get(k)]
        out.append(
            Check(
                "every kind of client completed connections",
                not missing,
                ",".join(missing) or "all",
                "all",
            )
        )
        did = doc["chaos_actions"]
        absent = [a for a in ("change", "bad_file", "kill_backend", "sighup") if not did.get(a)]
        out.append(
            Check(
                "chaos did each main action",
                not absent,
                ",".join(absent) or "all",
                "all",
                gating=m.name == "full",
            )
        )
        return out


def hostile_checks(v: Verdicts) -> list[Check]:
    """One check per hostile pattern: no illegitimate end, and at least one connection that
    went exactly right for every variant on every TIGHT listener (else it proves nothing)."""
    out = []
    for name, kind, variants in HOSTILE_CHECKS:
        assert all(x in HOSTILE_VARIANTS[kind] for x in variants)
        ran = failed = 0
        bad: Counter[str] = Counter()
        unproven = []
        for variant in variants:
            for listener in TIGHT:
                key = f"{kind}.{variant}@{listener}"
                causes = v.hostile.get(key, Counter())
                ran += causes.total()
                if not any(causes[c] for c in HOSTILE_PASSES):
                    unproven.append(key)
                for cause, n in causes.items():
                    if cause not in HOSTILE_PASSES and cause not in EXPECTED_CAUSES:
                        failed += n
                        bad[f"{cause} ({variant}@{listener})"] += n
        notes = [f"{c} x{n}" for c, n in bad.most_common(4)]
        if unproven:
            notes.append("never went right: " + ", ".join(unproven))
        out.append(
            Check(
                name,
                not failed and not unproven,
                f"{failed} failed of {ran}",
                "0 failed, each variant right at least once per listener",
                note="; ".join(notes),
            )
        )
    return out


def _series(key: tuple[str, tuple[tuple[str, str], ...]]) -> str:
    name, labels = key
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def _backend_trouble(workdir: Path) -> list[str]:
    out = []
    for f in sorted(workdir.glob("backend-*.log")):
        text = f.read_text(errors="replace")
        if "Traceback" in text:
            out.append(f"{f.name}: {text[text.index('Traceback') :][:300]}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tcpproxy-soak-") as tmp:
        procs = Processes(Path(tmp))
        soak = Soak(args, procs, Path(tmp))
        try:
            doc = _run_loop(soak)
        except KeyboardInterrupt:
            soak.say("interrupted: stopping the proxy, the backends and every client")
            return 130
        except StartError as exc:
            soak.say(f"cannot start: {exc}")
            return 2
        finally:
            procs.stop_all()
    stem = "soak-quick" if args.quick else "soak-latest"
    json_path: Path = args.json or RESULTS / f"{stem}.json"
    png_path: Path = args.png or RESULTS / f"{stem}.png"
    report.write_json(json_path, doc)
    try:
        report.write_png(png_path, doc)
    except ImportError:
        soak.say("matplotlib is not installed: no PNG (pip install -e '.[bench]')")
    print(report.text(doc))
    print(f"\nwrote {json_path} and {png_path}")
    return 0 if doc["verdict"]["pass"] else 1


def _run_loop(soak: Soak) -> dict[str, Any]:
    async def guarded() -> dict[str, Any]:
        # SIGTERM (a CI timeout, say) ends the run like Ctrl-C: children stopped, no report.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await soak.run()
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(guarded())
    result: dict[str, Any] = uvloop.run(guarded())
    return result


if __name__ == "__main__":
    sys.exit(main())
