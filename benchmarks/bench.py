"""Side-by-side benchmark: direct, tcpproxy, HAProxy and nginx stream over the same backends.

    python benchmarks/bench.py [--quick] [--only NAME ...] [--json PATH] [--png PATH]

Each round runs every workload against every target in turn (the order rotates per round), so
that all figures come from the same run under the same conditions; the result per figure is
the median over rounds, compared with HAProxy's. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import io
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tcpbench import report, workloads
from tcpbench.peers import PeerStatus, ensure_peers, machine_info, peer_versions
from tcpbench.procs import Processes, StartError, raise_nofile
from tcpbench.targets import (
    FLOOR,
    FLOOR_WORKLOADS,
    NOLOG_SUFFIX,
    Running,
    Target,
    start,
    tcpproxy_engine_setting,
    tcpproxy_target,
)
from tcpbench.workloads import (
    CONN_CLOSE_CHOICES,
    CONN_METRIC,
    FLOOD_PORT_KEY,
    FULL,
    IPERF_PORT_KEY,
    QUICK,
    REDIS_PORT_KEY,
    Measured,
    Params,
    WorkloadError,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_ENGINES = ("copy",)
GIT_TIMEOUT_S = 5.0
PEER_TARGETS = ("haproxy", "nginx")
# The peer program each workload needs (None: Python only), and the backend it talks to.
WORKLOAD_NEEDS: dict[str, str | None] = {
    "bulk": "iperf3",
    "rr": "redis",
    "conn": "redis",
    "latency": "redis",
    "memory": "redis",
    "blocked": None,
}
WORKLOAD_BACKEND = {
    "bulk": IPERF_PORT_KEY,
    "rr": REDIS_PORT_KEY,
    "conn": REDIS_PORT_KEY,
    "latency": REDIS_PORT_KEY,
    "memory": REDIS_PORT_KEY,
    "blocked": FLOOD_PORT_KEY,
}
# A failed measurement is recorded and the run goes on.
MEASURE_ERRORS = (WorkloadError, StartError, subprocess.TimeoutExpired, OSError)


class Progress:
    """One line per step on stderr, with elapsed time and a step counter."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.total = 0
        self.done = 0

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)

    def step(self, text: str) -> None:
        self.done += 1
        self.say(f"({self.done}/{self.total}) {text}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark tcpproxy against direct, HAProxy and nginx on loopback.",
    )
    p.add_argument("--quick", action="store_true", help="short run (< 1 minute) for checks")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=[],
        help=f"workloads ({', '.join(report.WORKLOADS)}) and/or targets "
        "(direct, haproxy, nginx, tcpproxy-ENGINE, python-floor) to run; default all but "
        "python-floor",
    )
    p.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help="tcpproxy relay engines, each run as target tcpproxy-ENGINE, comma-separated "
        "(default: copy)",
    )
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument(
        "--conn-close",
        choices=CONN_CLOSE_CHOICES,
        default="both",
        help="new connections: who closes first, the server (conn_per_s) or the client "
        "(conn_client_close_per_s); default both, one after the other",
    )
    p.add_argument(
        "--no-access-log",
        action="store_true",
        help="also run each engine with tcpproxy's --no-access-log, as target "
        "tcpproxy-ENGINE-nolog, to show what the access log costs (it is on by default, "
        "as users run it)",
    )
    p.add_argument(
        "--client-hash",
        action="store_true",
        help="also run each engine with `balance: client_hash` (two backends, 80/20), as "
        "target tcpproxy-ENGINE-hash, to show what hashing the client address costs",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run each engine as it was at git revision REV, as target "
        "tcpproxy-ENGINE@REV, in the same rounds: the before and after of a change",
    )
    p.add_argument(
        "--python-floor",
        action="store_true",
        help="also run target python-floor (conn and rr only): the leanest relay of "
        "tcpproxy's design, no bookkeeping at all, to show what Python itself costs",
    )
    p.add_argument(
        "--json",
        type=Path,
        help="JSON output (default results/latest.json, results/quick.json with --quick)",
    )
    p.add_argument("--png", type=Path, help="PNG chart (default next to the JSON's default)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install peers")
    return p.parse_args(argv)


def _select(
    only: Sequence[str],
    engines: Sequence[str],
    no_access_log: bool,
    *,
    client_hash: bool = False,
    floor: bool = False,
    baseline: tuple[str, str] | None = None,
) -> tuple[list[str], list[Target]]:
    all_targets = [
        Target("direct", "direct"),
        Target("haproxy", "haproxy"),
        Target("nginx", "nginx"),
        *(tcpproxy_target(e) for e in engines),
        *(tcpproxy_target(e, access_log=False) for e in engines),
        *(tcpproxy_target(e, balance="client_hash") for e in engines),
        Target(FLOOR, "floor"),
        *(tcpproxy_target(e, baseline=baseline) for e in engines if baseline is not None),
    ]
    names = {t.name for t in all_targets}
    unknown = [n for n in only if n not in names and n not in report.WORKLOADS]
    if unknown:
        raise SystemExit(
            f"--only: unknown name(s) {', '.join(unknown)}; "
            f"known: {', '.join([*report.WORKLOADS, *sorted(names)])}"
        )
    wl = [w for w in report.WORKLOADS if w in only] or list(report.WORKLOADS)
    # A baseline (--baseline) runs beside the engine it is the earlier state of.
    ts = [t for t in all_targets if t.name in only or (t.source and t.name.split("@")[0] in only)]
    ts = ts or [
        t
        for t in all_targets
        if (t.access_log or no_access_log)
        and (t.balance == "round_robin" or client_hash)
        and (t.kind != "floor" or floor)
    ]
    return wl, ts


def _extract(rev: str, workdir: Path) -> tuple[str, str]:
    """The tcpproxy package as it was at git revision `rev`, in a tree of its own: (a short
    name for the revision, the tree's path). Exits with one line when git cannot give it."""
    tree = workdir / "baseline"
    tree.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(HERE.parent), "archive", "--format=tar", rev, "tcpproxy"],
            capture_output=True,
            timeout=GIT_TIMEOUT_S * 10,
            check=True,
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            # Our own repository's archive; the filter where this Python has one (3.11.4+).
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tree, filter="data")
            else:
                tar.extractall(tree)
        short = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", rev],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace").strip() if isinstance(detail, bytes) else detail
        why = text or exc
        raise SystemExit(f"--baseline {rev}: cannot get tcpproxy at that revision: {why}") from None
    return short, str(tree)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class Bench:
    """One run: peers, backends, targets, the interleaved rounds, and the report."""

    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.progress = Progress()
        self.say = self.progress.say
        params = QUICK if args.quick else FULL
        if args.rounds:
            params = Params(**{**params.to_json(), "rounds": args.rounds})
        params = Params(**{**params.to_json(), "conn_close": args.conn_close})
        self.params: Params = params
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        baseline = _extract(args.baseline, workdir) if args.baseline else None
        self.workloads, self.wanted_targets = _select(
            args.only,
            engines,
            args.no_access_log,
            client_hash=args.client_hash,
            floor=args.python_floor,
            baseline=baseline,
        )
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.backends: dict[str, int] = {}
        self.running: dict[str, Running] = {}
        self.engine_settings: dict[str, str | None] = {}
        self.idle_count = workloads.idle_conns_possible(params.idle_conns)
        self.blocked_count = workloads.idle_conns_possible(params.blocked_conns)
        self.samples = report.Samples()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say(text)

    # --- setup ------------------------------------------------------------------------------

    def ensure_peers(self) -> PeerStatus:
        """Install (root + apt) or skip each missing program, with one clear line each."""
        names = sorted(
            {n for w in self.workloads if (n := WORKLOAD_NEEDS[w]) is not None}
            | {t.kind for t in self.wanted_targets if t.kind in PEER_TARGETS}
        )
        status = ensure_peers(names, install=not self.args.no_install, say=self.say)
        for w in list(self.workloads):
            need = WORKLOAD_NEEDS[w]
            if need is not None and not status.available.get(need):
                self.skipped[w] = f"needs {need}: {status.reasons.get(need, 'missing')}"
                self.say(f"workload {w}: SKIPPED: {self.skipped[w]}")
                self.workloads.remove(w)
        return status

    def start_targets(self, status: PeerStatus) -> list[Target]:
        """Start each target once (memory uses fresh ones); a failure skips it with its reason."""
        for t in self.wanted_targets:
            if t.kind in PEER_TARGETS and not status.available.get(t.kind):
                self.skipped[t.name] = status.reasons.get(t.kind, "missing")
                continue
            try:
                if t.kind == "tcpproxy":
                    assert t.engine is not None
                    setting, note = tcpproxy_engine_setting(
                        t.engine, self.backends, self.workdir, t.source
                    )
                    self.engine_settings[t.name] = setting
                    if note:
                        self.note(note)
                self.running[t.name] = self.start(t)
            except StartError as exc:
                self.skipped[t.name] = str(exc)
                self.say(f"{t.name}: SKIPPED: {exc}")
                continue
            ports = ", ".join(f"{k} :{v}" for k, v in self.running[t.name].ports.items())
            self.say(f"{t.name}: ready ({ports})")
        return [t for t in self.wanted_targets if t.name in self.running]

    def start(self, t: Target) -> Running:
        return start(t, self.procs, self.backends, self.workdir, self.engine_settings.get(t.name))

    # --- measuring --------------------------------------------------------------------------

    def parts(self, w: str, t: Target) -> list[tuple[tuple[str, ...], Callable[[], Measured]]]:
        """The measurements of one workload through one target: (the metrics it gives, the
        first one main, and how to run it)."""
        r = self.running[t.name]
        p = self.params
        if w == "bulk":
            return [(("bulk_gbit_s",), lambda: workloads.bulk(r, p))]
        if w == "rr":
            return [(("rr_req_s",), lambda: workloads.request_response(r, p))]
        if w == "conn":
            return [
                ((CONN_METRIC[close],), functools.partial(workloads.new_connections, r, p, close))
                for close in p.conn_closes
            ]
        if w == "latency":
            return [(("latency_p50_us", "latency_p99_us"), lambda: workloads.latency(r, p))]
        if w == "blocked":
            count = self.blocked_count
            return [
                (
                    ("blocked_kib_per_conn",),
                    lambda: workloads.blocked_memory(lambda: self.start(t), p, count),
                )
            ]
        count = self.idle_count
        return [
            (("idle_kib_per_conn",), lambda: workloads.idle_memory(lambda: self.start(t), count))
        ]

    def revive(self, t: Target) -> None:
        """Restart a target whose process died, so one crash does not void the rest."""
        r = self.running[t.name]
        if r.server is None or r.server.proc.poll() is None:
            return
        self.say(f"{t.name}: exited (code {r.server.proc.returncode}), restarting it")
        try:
            self.running[t.name] = self.start(t)
        except StartError as exc:
            self.say(f"{t.name}: restart failed: {exc}")

    def run_rounds(self, targets: list[Target]) -> None:
        rounds = self.params.rounds
        self.progress.total = rounds * sum(
            sum(1 for t in targets if not _proxy_only(w, t)) for w in self.workloads
        )
        for rnd in range(rounds):
            shift = rnd % len(targets) if targets else 0
            order = targets[shift:] + targets[:shift]
            for w in self.workloads:
                round_latency: dict[str, dict[str, float]] = {}
                for t in order:
                    if _proxy_only(w, t):
                        for m in report.METRICS:
                            if m.workload == w:
                                self.samples.add(m.key, t.name, None)
                        continue
                    got = self.one(w, t, f"round {rnd + 1}/{rounds} {w:<8} {t.name:<14}")
                    if w == "latency" and got is not None:
                        round_latency[t.name] = {k: v for k, v in got.items() if v is not None}
                if w == "latency":
                    report.add_derived(self.samples, round_latency)

    def one(self, w: str, t: Target, label: str) -> workloads.Metrics | None:
        """Every measurement of workload w through target t; a failed one is recorded and
        the others still run."""
        r = self.running[t.name]
        if r.server is not None and r.server.proc.poll() is not None:
            self.revive(t)
        all_got: workloads.Metrics = {}
        failures: list[str] = []
        for keys, run in self.parts(w, t):
            main = keys[0]
            cpu_key, scale = report.CPU_METRICS.get(main, ("", 0.0))
            server = self.running[t.name].server
            cpu0 = server.cpu_seconds() if server is not None else 0.0
            try:
                if server is not None and server.proc.poll() is not None:
                    raise WorkloadError(f"{t.name} has exited: {server.log_tail()}")
                got, work = run()
            except MEASURE_ERRORS as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.samples.fail([*keys, *([cpu_key] if cpu_key else [])], t.name, msg)
                failures.append(f"{main} FAILED: {msg}")
                self.revive(t)
                continue
            if cpu_key and server is not None and work > 0:
                got[cpu_key] = (server.cpu_seconds() - cpu0) * scale / work
            for key, value in got.items():
                self.samples.add(key, t.name, value)
            all_got.update(got)
        brief = ", ".join([f"{k} {v:.4g}" for k, v in all_got.items() if v is not None] + failures)
        self.progress.step(f"{label} {brief}")
        return None if failures and not all_got else all_got

    # --- the whole run ----------------------------------------------------------------------

    def run(self) -> int:
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        raise_nofile()
        status = self.ensure_peers()
        machine = machine_info()
        versions = peer_versions(status)
        self.say(report.header_text(machine, versions).replace("\n", "; "))
        for w, got, wanted in (
            ("memory", self.idle_count, self.params.idle_conns),
            ("blocked", self.blocked_count, self.params.blocked_conns),
        ):
            if w in self.workloads and got < wanted:
                self.note(
                    f"{w}: {got} connections instead of {wanted}: the RLIMIT_NOFILE hard "
                    f"limit is {machine['nofile_limit']} and a proxy needs 2 fds per connection"
                )
        if self.workloads:
            needed = {WORKLOAD_BACKEND[w] for w in self.workloads}
            self.backends = workloads.start_backends(self.procs, self.workdir, needed)
            labels = {
                REDIS_PORT_KEY: "redis-server",
                IPERF_PORT_KEY: "iperf3 -s",
                FLOOD_PORT_KEY: "loadclient.py flood",
            }
            self.say(
                "backends: " + ", ".join(f"{labels[k]} on :{v}" for k, v in self.backends.items())
            )
        targets = self.start_targets(status)
        names = [t.name for t in targets]
        self.run_rounds(targets)

        metrics = report.summarize(self.samples, names, self.workloads)
        proxies = [t for t in targets if t.kind == "tcpproxy"]
        # The targets are what users run: this tcpproxy with its access log on.
        checked = [t.name for t in proxies if t.access_log and t.source is None]
        checks = report.evaluate_checks(metrics, checked)
        twins = {
            t.name: t.name + NOLOG_SUFFIX
            for t in proxies
            if t.access_log and t.name + NOLOG_SUFFIX in names
        }
        doc: dict[str, Any] = {
            "schema": report.SCHEMA,
            "mode": "quick" if self.args.quick else "full",
            "started_at": started_at,
            "duration_s": round(time.monotonic() - self.progress.t0, 1),
            "command": " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
            "machine": machine,
            "versions": versions,
            "tcpproxy_commit": _git_commit(),
            "params": {
                **self.params.to_json(),
                "idle_conns": self.idle_count,
                "blocked_conns": self.blocked_count,
            },
            "targets": names,
            # tcpproxy's access log per tcpproxy target (on as users run it; -nolog: off).
            "access_log": {t.name: t.access_log for t in proxies},
            "access_log_cost": report.access_log_cost(metrics, twins),
            "workloads": self.workloads,
            "skipped": self.skipped,
            "notes": self.notes,
            "metrics": metrics,
            "checks": checks,
        }
        self.print_report(doc, [t.name for t in targets if t.kind != "direct"])
        stem = "quick" if self.args.quick else "latest"
        json_path: Path = self.args.json or RESULTS / f"{stem}.json"
        png_path: Path = self.args.png or RESULTS / f"{stem}.png"
        report.write_json(json_path, doc)
        try:
            report.write_png(png_path, doc)
        except ImportError:
            self.say("matplotlib is not installed: no PNG (pip install -e '.[bench]')")
        print(f"\nwrote {json_path} and {png_path} in {doc['duration_s']:.0f}s")
        return 0

    def print_report(self, doc: dict[str, Any], proxies: list[str]) -> None:
        print()
        print(report.header_text(doc["machine"], doc["versions"]))
        print(
            f"mode: {doc['mode']}, {self.params.rounds} round(s); "
            "median over rounds (ratio to HAProxy)"
        )
        print()
        print(report.table(doc["metrics"], doc["targets"]))
        cpu_table = report.table(doc["metrics"], proxies, diagnostic=True)
        if cpu_table:
            print("\nproxy CPU time (user + system) per unit of work, diagnostic:")
            print(cpu_table)
        logs = doc["access_log"]
        if logs:
            print(
                "\ntcpproxy access log: "
                + ", ".join(f"{t} {'on' if on else 'off'}" for t, on in logs.items())
            )
        if doc["access_log_cost"]:
            print(report.access_log_text(doc["access_log_cost"]))
        for text in doc["notes"]:
            print(f"note: {text}")
        for name, why in doc["skipped"].items():
            print(f"skipped {name}: {why}")
        if doc["checks"]:
            print("\ntargets (2-core machine, ratios from this run):")
            print(report.checks_text(doc["checks"]))


def _proxy_only(w: str, t: Target) -> bool:
    """Nothing to measure: a memory workload through no proxy at all, or a workload the
    floor relay is not made for."""
    if t.kind == "floor":
        return w not in FLOOR_WORKLOADS
    return w in report.PROXY_ONLY_WORKLOADS and t.kind == "direct"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="tcpbench-") as tmp:
        procs = Processes(Path(tmp))
        bench = Bench(args, procs, Path(tmp))
        try:
            return bench.run()
        except KeyboardInterrupt:
            bench.say("interrupted: stopping every server and client")
            return 130
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
