"""What traffic goes through: nothing (direct), HAProxy, nginx stream, tcpproxy variants.

Every proxy gets its own temp config, one listener per backend, on free loopback ports, and
runs as a child process in the foreground with one thread / one worker.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .peers import nginx_stream_module_path, which
from .procs import HOST, STOP_TIMEOUT_S, Processes, Server, StartError, free_port, nofile_limit

CHECK_TIMEOUT_S = 30.0


FLOOR = "python-floor"  # tcpbench/floor_relay.py: only for the conn and rr workloads
FLOOR_WORKLOADS = frozenset({"conn", "rr"})
NOLOG_SUFFIX = "-nolog"
HASH_SUFFIX = "-hash"


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # direct | haproxy | nginx | tcpproxy | floor
    engine: str | None = None  # tcpproxy relay engine (copy, splice, ...)
    # tcpproxy's access log (one line per closed connection): on by default, as users run it.
    access_log: bool = True
    balance: str = "round_robin"  # tcpproxy's `balance`: round_robin or client_hash
    # A directory holding a tcpproxy package to run instead of this checkout's (bench.py
    # --baseline REV): the process runs in it, and `python -m` looks there first.
    source: str | None = None


@dataclass
class Running:
    target: Target
    ports: dict[str, int]  # backend name -> port to connect to
    server: Server | None  # None for direct

    def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        if self.server is not None:
            self.server.stop(grace_s)


def tcpproxy_target(
    engine: str,
    access_log: bool = True,
    balance: str = "round_robin",
    baseline: tuple[str, str] | None = None,
) -> Target:
    """tcpproxy-ENGINE; tcpproxy-ENGINE-nolog run with --no-access-log; tcpproxy-ENGINE-hash
    with `balance: client_hash`; tcpproxy-ENGINE@REV the tree `baseline` (REV, path)."""
    suffix = "" if access_log else NOLOG_SUFFIX
    if balance == "client_hash":
        suffix += HASH_SUFFIX
    if baseline is not None:
        suffix += f"@{baseline[0]}"
    source = baseline[1] if baseline is not None else None
    return Target(f"tcpproxy-{engine}{suffix}", "tcpproxy", engine, access_log, balance, source)


def _max_conns() -> int:
    # Each proxied connection holds two fds; keep some for listeners, logs and the like.
    return max(1000, (nofile_limit() - 200) // 2)


def haproxy_config(backends: Mapping[str, int], ports: Mapping[str, int]) -> str:
    maxconn = _max_conns()
    lines = [
        "global",
        "  nbthread 1",
        f"  maxconn {maxconn}",
        "defaults",
        "  mode tcp",
        f"  maxconn {maxconn}",
        "  timeout connect 5s",
        "  timeout client 1h",
        "  timeout server 1h",
    ]
    for name, backend_port in backends.items():
        lines += [
            f"listen {name}",
            f"  bind {HOST}:{ports[name]}",
            f"  server {name}1 {HOST}:{backend_port}",
        ]
    return "\n".join(lines) + "\n"


def nginx_config(backends: Mapping[str, int], ports: Mapping[str, int], workdir: Path) -> str:
    limit = nofile_limit()
    lines = [
        f"load_module {nginx_stream_module_path()};",
        "worker_processes 1;",
        "daemon off;",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'nginx-error.log'} warn;",
        f"worker_rlimit_nofile {limit};",
        f"events {{ worker_connections {limit - 100}; }}",
        "stream {",
    ]
    for name, backend_port in backends.items():
        lines += [
            f"  upstream {name} {{ server {HOST}:{backend_port}; }}",
            f"  server {{ listen {HOST}:{ports[name]}; proxy_pass {name}; proxy_timeout 1h; }}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def tcpproxy_config(
    backends: Mapping[str, int],
    ports: Mapping[str, int],
    engine: str | None,
    balance: str = "round_robin",
) -> str:
    # With client_hash, the canary's shape: two backends weighted 80/20 (at the one backend
    # address), so that every pick hashes the client against both.
    weights = (("b1", 80), ("b2", 20)) if balance == "client_hash" else (("b1", 1),)
    lines = ["listeners:"]
    for name, backend_port in backends.items():
        lines += [f"  - name: {name}", f'    bind: "{HOST}:{ports[name]}"', "    backends:"]
        for backend, weight in weights:
            lines += [
                f"      - name: {backend}",
                f'        address: "{HOST}:{backend_port}"',
                f"        weight: {weight}",
            ]
        lines.append("    max_connections: 100000")
        if engine is not None:
            lines.append(f"    engine: {engine}")
        if balance != "round_robin":
            lines.append(f"    balance: {balance}")
    return "\n".join(lines) + "\n"


def _tcpproxy_argv(config: Path, access_log: bool) -> list[str]:
    # Log level info, the default: the access log is written at info (to a file here, as
    # the harness keeps every child's output), unless --no-access-log.
    argv = [
        sys.executable,
        "-m",
        "tcpproxy",
        "run",
        "--config",
        str(config),
        "--admin",
        "off",
        "--log-level",
        "info",
    ]
    return argv if access_log else [*argv, "--no-access-log"]


def tcpproxy_engine_setting(
    engine: str, backends: Mapping[str, int], workdir: Path, source: str | None = None
) -> tuple[str | None, str]:
    """Which `engine:` value to write for this engine, and a note for the user.

    Returns (None, note) when tcpproxy has no `engine` setting yet and the engine is the
    default (copy): the config then leaves the key out. Raises StartError when the engine is
    not supported.
    """
    probe = workdir / f"probe-{engine}.yaml"
    dummy = {name: free_port() for name in backends}
    probe.write_text(tcpproxy_config(backends, dummy, engine))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tcpproxy", "check", "--config", str(probe)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
            cwd=source,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartError(f"tcpproxy check failed to run: {exc}") from exc
    if proc.returncode == 0:
        return engine, ""
    lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
    problem = next((line for line in lines if "engine" in line), None)
    if problem is not None and engine == "copy":
        return None, "tcpproxy has no `engine` setting yet: running its default relay (copy)"
    if problem is not None:
        raise StartError(f"tcpproxy does not support engine {engine!r}: {problem}")
    # `check` itself may not exist yet or may reject something else: let `run` decide.
    return (None if engine == "copy" else engine), ""


def start(
    target: Target,
    procs: Processes,
    backends: Mapping[str, int],
    workdir: Path,
    engine_setting: str | None = None,
) -> Running:
    """Start the target in front of `backends` (name -> port); StartError if it fails."""
    if target.kind == "direct":
        return Running(target, dict(backends), None)
    ports = {name: free_port() for name in backends}
    tag = f"{target.name}-{ports[next(iter(ports))]}"
    if target.kind == "haproxy":
        cfg = workdir / f"{tag}.cfg"
        cfg.write_text(haproxy_config(backends, ports))
        binary = which("haproxy") or "haproxy"
        server = procs.start(target.name, [binary, "-db", "-f", str(cfg)])
    elif target.kind == "nginx":
        nginx_dir = workdir / tag
        nginx_dir.mkdir()
        cfg = nginx_dir / "nginx.conf"
        cfg.write_text(nginx_config(backends, ports, nginx_dir))
        binary = which("nginx") or "nginx"
        server = procs.start(
            target.name, [binary, "-p", str(nginx_dir), "-c", str(cfg), "-e", "stderr"]
        )
    elif target.kind == "floor":
        relay = Path(__file__).with_name("floor_relay.py")
        pairs = [f"{ports[name]}:{port}" for name, port in backends.items()]
        server = procs.start(target.name, [sys.executable, str(relay), *pairs])
    elif target.kind == "tcpproxy":
        cfg = workdir / f"{tag}.yaml"
        cfg.write_text(tcpproxy_config(backends, ports, engine_setting, target.balance))
        argv = _tcpproxy_argv(cfg, target.access_log)
        server = procs.start(target.name, argv, cwd=target.source)
    else:
        raise StartError(f"unknown target kind {target.kind!r}")
    try:
        server.wait_ready(list(ports.values()))
    except StartError:
        server.stop()
        raise
    return Running(target, ports, server)
