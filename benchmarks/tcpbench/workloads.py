"""The backends, and the five workloads measured through each target."""

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .peers import which
from .procs import HOST, Processes, StartError, free_port, nofile_limit, run_checked
from .targets import Running

LOADCLIENT = Path(__file__).with_name("loadclient.py")
CLIENT_SLACK_S = 30.0  # on top of a workload's own duration, before a client is killed
IDLE_SETTLE_S = 0.5
IDLE_WARM_CONNS = 50
REDIS_PORT_KEY = "redis"
IPERF_PORT_KEY = "iperf3"


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
    conn_close: str
    latency_rate: float
    latency_s: float
    latency_conns: int
    idle_conns: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Params(
    rounds=1,
    bulk_s=2,
    bulk_omit_s=0,
    rr_clients=50,
    rr_requests=60_000,
    conn_s=1.5,
    conn_procs=2,
    conn_concurrency=16,
    conn_close="server",
    latency_rate=1000.0,
    latency_s=1.5,
    latency_conns=10,
    idle_conns=1000,
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
    conn_close="server",
    latency_rate=1000.0,
    latency_s=5.0,
    latency_conns=10,
    idle_conns=10_000,
)


def idle_conns_possible(wanted: int) -> int:
    """A proxy holds 2 fds per connection and cannot exceed the hard RLIMIT_NOFILE."""
    return min(wanted, (nofile_limit() - 200) // 2)


# --- backends -------------------------------------------------------------------------------


def start_backends(procs: Processes, workdir: Path) -> dict[str, int]:
    """redis-server (request/response, new connections, latency, idle) and iperf3 -s (bulk)."""
    redis_port = free_port()
    redis = procs.start(
        "redis-server",
        [
            which("redis-server") or "redis-server",
            "--port",
            str(redis_port),
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
    iperf_port = free_port()
    iperf = procs.start(
        "iperf3-server", [which("iperf3") or "iperf3", "-s", "-B", HOST, "-p", str(iperf_port)]
    )
    redis.wait_ready([redis_port])
    iperf.wait_ready([iperf_port])
    return {REDIS_PORT_KEY: redis_port, IPERF_PORT_KEY: iperf_port}


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


def new_connections(running: Running, params: Params) -> Measured:
    """Several client processes (the kernel's connect path is costly), started together."""
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
        params.conn_close,
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
    return {"conn_per_s": sum(float(r["rate"]) for r in results)}, float(ok)


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


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise WorkloadError(f"idle client gave no answer in {timeout:.0f}s")
    return proc.stdout.readline()


def idle_memory(fresh: Callable[[], Running], count: int) -> Measured:
    """RSS growth of a fresh proxy process per idle proxied connection, in KiB."""
    try:
        running = fresh()
    except StartError as exc:
        raise WorkloadError(str(exc)) from exc
    server = running.server
    if server is None:
        running.stop()
        return {"idle_kib_per_conn": None}, 0.0
    try:
        port = running.ports[REDIS_PORT_KEY]
        _warm(port, IDLE_WARM_CONNS)
        time.sleep(IDLE_SETTLE_S)
        before = server.rss_kib()
        client = subprocess.Popen(
            _client_argv("idle", "--port", str(port), "--count", str(count)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            line = _read_line(client, timeout=CLIENT_SLACK_S + count / 500)
            if not line.startswith("READY "):
                raise WorkloadError(f"idle client: {line.strip() or 'exited'}")
            opened = int(json.loads(line[len("READY ") :])["ok"])
            time.sleep(IDLE_SETTLE_S)
            after = server.rss_kib()
            assert client.stdin is not None
            client.stdin.write("close\n")
            client.stdin.flush()
            client.communicate(timeout=CLIENT_SLACK_S)
        finally:
            if client.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(client.pid, signal.SIGKILL)
                client.communicate()
    finally:
        running.stop()
    if opened < count * 0.99:
        raise WorkloadError(f"only {opened} of {count} idle connections opened")
    return {"idle_kib_per_conn": (after - before) / opened}, 0.0
