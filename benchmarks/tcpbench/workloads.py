"""The backends, and the six workloads measured through each target."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .peers import which
from .procs import HOST, Processes, Server, StartError, free_port, nofile_limit, run_checked
from .targets import Running

LOADCLIENT = Path(__file__).with_name("loadclient.py")
CLIENT_SLACK_S = 30.0  # on top of a workload's own duration, before a client is killed
IDLE_SETTLE_S = 0.5
# A memory workload's process is thrown away: no graceful drain of its connections.
FRESH_STOP_GRACE_S = 0.5
IDLE_WARM_CONNS = 50
# blocked: the client gives up filling after this; RSS moves within this count as stable.
BLOCKED_SETTLE_MAX_S = 60.0
BLOCKED_RSS_TOL_KIB = 64
BLOCKED_MAX_DEAD = 0.01  # share of blocked connections that may be reset before READY
REDIS_PORT_KEY = "redis"
IPERF_PORT_KEY = "iperf3"
FLOOD_PORT_KEY = "flood"
# Who closes a new connection first -> its metric.
CONN_METRIC = {"server": "conn_per_s", "client": "conn_client_close_per_s"}
CONN_CLOSE_CHOICES = ("both", *CONN_METRIC)


class WorkloadError(RuntimeError):
    """A measurement failed; the message is one line for the user."""


@dataclass(frozen=True)
class Params:
    rounds: int
    bulk_s: int  # iperf3 -t takes whole seconds
    bulk_omit_s: int
    rr_clients: int
    rr_requests: int
    conn_s: float
    conn_procs: int
    conn_concurrency: int
    conn_close: str  # server, client or both
    latency_rate: float
    latency_s: float
    latency_conns: int
    idle_conns: int
    blocked_conns: int
    blocked_warm: int
    blocked_quiet_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def conn_closes(self) -> tuple[str, ...]:
        return tuple(CONN_METRIC) if self.conn_close == "both" else (self.conn_close,)


QUICK = Params(
    rounds=1,
    bulk_s=2,
    bulk_omit_s=0,
    rr_clients=50,
    rr_requests=60_000,
    conn_s=1.5,
    conn_procs=2,
    conn_concurrency=16,
    conn_close="both",
    latency_rate=1000.0,
    latency_s=1.5,
    latency_conns=10,
    idle_conns=1000,
    blocked_conns=100,
    blocked_warm=5,
    blocked_quiet_s=0.5,
)
FULL = Params(
    rounds=3,
    bulk_s=5,
    bulk_omit_s=1,
    rr_clients=50,
    rr_requests=300_000,
    conn_s=5.0,
    conn_procs=2,
    conn_concurrency=16,
    conn_close="both",
    latency_rate=1000.0,
    latency_s=5.0,
    latency_conns=10,
    idle_conns=10_000,
    blocked_conns=500,
    blocked_warm=10,
    blocked_quiet_s=1.0,
)


def idle_conns_possible(wanted: int) -> int:
    """A proxy holds 2 fds per connection and cannot exceed the hard RLIMIT_NOFILE."""
    return min(wanted, (nofile_limit() - 200) // 2)


# --- backends -------------------------------------------------------------------------------


def start_backends(procs: Processes, workdir: Path, needed: Collection[str]) -> dict[str, int]:
    """The backends the workloads need, by name: redis-server (request/response, new
    connections, latency, idle), iperf3 -s (bulk) and loadclient.py flood (blocked)."""
    ports = {name: free_port() for name in (REDIS_PORT_KEY, IPERF_PORT_KEY, FLOOD_PORT_KEY)}
    started: list[tuple[Server, int]] = []
    if REDIS_PORT_KEY in needed:
        redis = procs.start(
            "redis-server",
            [
                which("redis-server") or "redis-server",
                "--port",
                str(ports[REDIS_PORT_KEY]),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
                "--maxclients",
                str(nofile_limit() - 100),
                "--dir",
                str(workdir),
            ],
        )
        started.append((redis, ports[REDIS_PORT_KEY]))
    if IPERF_PORT_KEY in needed:
        iperf = procs.start(
            "iperf3-server",
            [which("iperf3") or "iperf3", "-s", "-B", HOST, "-p", str(ports[IPERF_PORT_KEY])],
        )
        started.append((iperf, ports[IPERF_PORT_KEY]))
    if FLOOD_PORT_KEY in needed:
        # Exits by itself once this process is gone, whatever ends the run.
        flood = procs.start("flood", _client_argv("flood", "--port", str(ports[FLOOD_PORT_KEY])))
        started.append((flood, ports[FLOOD_PORT_KEY]))
    for server, port in started:
        server.wait_ready([port])
    return {name: port for name, port in ports.items() if name in needed}


# --- workloads ------------------------------------------------------------------------------

Metrics = dict[str, float | None]
# What a workload measured, and how much work went through (bytes, requests or connections)
# so that the harness can divide the proxy's CPU time by it.
Measured = tuple[Metrics, float]


def bulk(running: Running, params: Params) -> Measured:
    """One iperf3 stream, client to server, through the target."""
    argv = [
        which("iperf3") or "iperf3",
        "-c",
        HOST,
        "-p",
        str(running.ports[IPERF_PORT_KEY]),
        "-t",
        str(params.bulk_s),
        "-P",
        "1",
        "-J",
    ]
    if params.bulk_omit_s:
        argv += ["-O", str(params.bulk_omit_s)]
    timeout = params.bulk_s + params.bulk_omit_s + CLIENT_SLACK_S
    last = ""
    for _attempt in range(3):  # the server may still be closing the previous test
        proc = run_checked(argv, timeout)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            data = {"error": (proc.stderr or proc.stdout).strip()[:200]}
        if "error" not in data and proc.returncode == 0:
            received = data["end"]["sum_received"]
            bps = float(received["bits_per_second"])
            return {"bulk_gbit_s": bps / 1e9}, float(received["bytes"])
        last = str(data.get("error", f"exit {proc.returncode}"))
        time.sleep(0.5)
    raise WorkloadError(f"iperf3: {last}")


def request_response(running: Running, params: Params) -> Measured:
    """redis-benchmark GET, N kept-alive clients, no pipelining."""
    argv = [
        which("redis-benchmark") or "redis-benchmark",
        "-h",
        HOST,
        "-p",
        str(running.ports[REDIS_PORT_KEY]),
        "-c",
        str(params.rr_clients),
        "-n",
        str(params.rr_requests),
        "-t",
        "get",
        "--csv",
    ]
    proc = run_checked(argv, timeout=params.rr_requests / 5000 + CLIENT_SLACK_S)
    for row in csv.reader(io.StringIO(proc.stdout)):
        if row and row[0] == "GET":
            return {"rr_req_s": float(row[1])}, float(params.rr_requests)
    raise WorkloadError(
        f"redis-benchmark gave no result (exit {proc.returncode}): "
        + (proc.stderr.strip() or proc.stdout.strip())[:200]
    )


def _client_argv(*args: str) -> list[str]:
    return [sys.executable, str(LOADCLIENT), *args]


def new_connections(running: Running, params: Params, close: str) -> Measured:
    """Several client processes (the kernel's connect path is costly), started together;
    `close`: who closes first, the server (after QUIT) or the client (after PING)."""
    start_at = time.time() + 0.8  # time for the interpreters to start and import uvloop
    argv = _client_argv(
        "conn",
        "--port",
        str(running.ports[REDIS_PORT_KEY]),
        "--concurrency",
        str(params.conn_concurrency),
        "--duration",
        str(params.conn_s),
        "--start-at",
        f"{start_at:.3f}",
        "--close",
        close,
    )
    clients = [
        subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(params.conn_procs)
    ]
    results: list[dict[str, Any]] = []
    try:
        for client in clients:
            out, err = client.communicate(timeout=params.conn_s + CLIENT_SLACK_S)
            try:
                results.append(json.loads(out.strip().splitlines()[-1]))
            except (json.JSONDecodeError, IndexError) as exc:
                raise WorkloadError(f"load client failed: {err.strip()[-200:]}") from exc
    finally:
        for client in clients:
            if client.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(client.pid, signal.SIGKILL)
                client.communicate()
    ok = sum(int(r["ok"]) for r in results)
    errors = sum(int(r["errors"]) for r in results)
    if ok == 0 or errors > ok // 100:
        raise WorkloadError(f"{errors} failed connections for {ok} good ones")
    return {CONN_METRIC[close]: sum(float(r["rate"]) for r in results)}, float(ok)


def latency(running: Running, params: Params) -> Measured:
    argv = _client_argv(
        "latency",
        "--port",
        str(running.ports[REDIS_PORT_KEY]),
        "--rate",
        str(params.latency_rate),
        "--duration",
        str(params.latency_s),
        "--connections",
        str(params.latency_conns),
    )
    proc = run_checked(argv, timeout=params.latency_s + CLIENT_SLACK_S)
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        raise WorkloadError(f"latency client failed: {proc.stderr.strip()[-200:]}") from exc
    if data["received"] < data["sent"] or data["sent"] == 0:
        raise WorkloadError(f"latency: {data['received']} replies for {data['sent']} requests")
    got: Metrics = {
        "latency_p50_us": float(data["p50_us"]),
        "latency_p99_us": float(data["p99_us"]),
    }
    return got, float(data["received"])


def _warm(port: int, count: int) -> None:
    """Open and close a few connections so lazy first-use allocations are not counted."""
    for _ in range(count):
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            got = b""
            while not got.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk


class _HeldClient:
    """A load client that holds its connections and talks with us in lines (stdin/stdout)."""

    def __init__(self, mode: str, *args: str) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            _client_argv(mode, *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def expect(self, word: str, timeout: float) -> dict[str, Any]:
        """Wait for the line `WORD {json}` and return the JSON."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise WorkloadError(f"{self.mode} client gave no answer in {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line.startswith(word + " "):
            err = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()[-300:].strip()
            raise WorkloadError(f"{self.mode} client: {line.strip() or err or 'exited'}")
        got: dict[str, Any] = json.loads(line[len(word) + 1 :])
        return got

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        """Tell it to close everything, and wait for it to exit."""
        self.say("close")
        self.proc.communicate(timeout=CLIENT_SLACK_S)

    def kill(self) -> None:
        """Whatever happened, no client is left behind."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


@contextlib.contextmanager
def _fresh_proxy(fresh: Callable[[], Running]) -> Iterator[Running]:
    """A newly started target process, stopped (killed if need be) afterwards."""
    try:
        running = fresh()
    except StartError as exc:
        raise WorkloadError(str(exc)) from exc
    try:
        yield running
    finally:
        running.stop(FRESH_STOP_GRACE_S)


def idle_memory(fresh: Callable[[], Running], count: int) -> Measured:
    """RSS growth of a fresh proxy process per idle proxied connection, in KiB."""
    with _fresh_proxy(fresh) as running:
        server = running.server
        if server is None:
            return {"idle_kib_per_conn": None}, 0.0
        port = running.ports[REDIS_PORT_KEY]
        _warm(port, IDLE_WARM_CONNS)
        time.sleep(IDLE_SETTLE_S)
        before = server.rss_kib()
        client = _HeldClient("idle", "--port", str(port), "--count", str(count))
        try:
            opened = int(client.expect("READY", timeout=CLIENT_SLACK_S + count / 500)["ok"])
            time.sleep(IDLE_SETTLE_S)
            after = server.rss_kib()
            client.finish()
        finally:
            client.kill()
    if opened < count * 0.99:
        raise WorkloadError(f"only {opened} of {count} idle connections opened")
    return {"idle_kib_per_conn": (after - before) / opened}, 0.0


def blocked_memory(fresh: Callable[[], Running], params: Params, count: int) -> Measured:
    """RSS growth of a fresh proxy process per connection with both directions blocked.

    The client (loadclient.py blocked) sends on each connection and never reads; the flood
    backend sends and never reads. The client fills a few warm-up connections (first-use
    allocations on that path) until nothing moves and the proxy's RSS is stable, and we take
    the RSS; it keeps them open and fills `count` more the same way, and we take the RSS
    again. The kernel's socket buffers are not in the RSS: what is measured is what the proxy
    holds in user space."""
    with _fresh_proxy(fresh) as running:
        server = running.server
        if server is None:
            return {"blocked_kib_per_conn": None}, 0.0
        client = _HeldClient(
            "blocked",
            "--port",
            str(running.ports[FLOOD_PORT_KEY]),
            "--count",
            str(count),
            "--warm",
            str(params.blocked_warm),
            "--rss-pids",
            ",".join(str(pid) for pid in server.pids()),
            "--quiet",
            str(params.blocked_quiet_s),
            "--rss-tol",
            str(BLOCKED_RSS_TOL_KIB),
            "--timeout",
            str(BLOCKED_SETTLE_MAX_S),
        )
        try:
            warmed = client.expect("WARMED", timeout=BLOCKED_SETTLE_MAX_S + CLIENT_SLACK_S)
            if not warmed["settled"]:
                raise WorkloadError(f"blocked warm-up: {warmed['why']}")
            before = server.rss_kib()
            client.say("go")
            ready = client.expect("READY", timeout=BLOCKED_SETTLE_MAX_S + CLIENT_SLACK_S)
            after = server.rss_kib()
            client.finish()
        finally:
            client.kill()
    opened, dead = int(ready["ok"]), int(ready["dead"])
    if not ready["settled"]:
        raise WorkloadError(f"blocked: {ready['why']} after {ready['settle_s']}s")
    if opened < count * 0.99:
        raise WorkloadError(f"only {opened} of {count} blocked connections opened")
    if dead > opened * BLOCKED_MAX_DEAD:
        raise WorkloadError(f"{dead} of {opened} blocked connections were reset")
    return {"blocked_kib_per_conn": (after - before) / opened}, 0.0
