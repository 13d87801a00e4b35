"""The programs the benchmark needs: find them, install the missing ones (root + apt), versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

APT_TIMEOUT_S = 600.0
VERSION_TIMEOUT_S = 10.0
NGINX_STREAM_MODULES = (
    Path("/usr/lib/nginx/modules/ngx_stream_module.so"),
    Path("/usr/share/nginx/modules/ngx_stream_module.so"),
)
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


@dataclass(frozen=True)
class Peer:
    """A program (or a few) that one target or workload needs, and how Debian ships it."""

    name: str
    binaries: tuple[str, ...]
    # Alternatives, first that installs wins (Debian 13 dropped nginx-light for nginx).
    apt_choices: tuple[tuple[str, ...], ...]
    extra_check: Callable[[], str | None] | None = None


def _nginx_stream_module() -> str | None:
    for path in NGINX_STREAM_MODULES:
        if path.exists():
            return None
    return "nginx stream module not found (" + ", ".join(map(str, NGINX_STREAM_MODULES)) + ")"


PEERS: dict[str, Peer] = {
    "haproxy": Peer("haproxy", ("haproxy",), (("haproxy",),)),
    "nginx": Peer(
        "nginx",
        ("nginx",),
        (("nginx-light", "libnginx-mod-stream"), ("nginx", "libnginx-mod-stream")),
        _nginx_stream_module,
    ),
    "redis": Peer("redis", ("redis-server", "redis-benchmark"), (("redis-server", "redis-tools"),)),
    "iperf3": Peer("iperf3", ("iperf3",), (("iperf3",),)),
}


def nginx_stream_module_path() -> Path:
    for path in NGINX_STREAM_MODULES:
        if path.exists():
            return path
    return NGINX_STREAM_MODULES[0]


def which(binary: str) -> str | None:
    # haproxy and nginx live in /usr/sbin, which a non-root PATH may lack.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(binary, path=path)


def missing(peer: Peer) -> str | None:
    """Why the peer cannot run here, or None when it can."""
    absent = [b for b in peer.binaries if which(b) is None]
    if absent:
        return "not installed (" + ", ".join(absent) + ")"
    if peer.extra_check is not None:
        return peer.extra_check()
    return None


@dataclass
class PeerStatus:
    available: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def ensure_peers(names: Sequence[str], install: bool, say: Callable[[str], None]) -> PeerStatus:
    """Install what is missing when we are root with apt-get, else skip it with a clear line."""
    status = PeerStatus()
    updated = False
    for name in names:
        peer = PEERS[name]
        reason = missing(peer)
        if reason is not None and install and _can_apt():
            for packages in peer.apt_choices:
                say(f"{name}: {reason}; installing: apt-get install -y {' '.join(packages)}")
                ok = _apt_install(packages, update_first=not updated, say=say)
                updated = True
                reason = missing(peer)
                if ok and reason is None:
                    break
        elif reason is not None and install:
            reason += "; not root or no apt-get, so not installing it"
        elif reason is not None:
            reason += "; --no-install given"
        if reason is None:
            status.available[name] = True
        else:
            status.available[name] = False
            status.reasons[name] = reason
            say(f"{name}: SKIPPED: {reason}")
    return status


def _can_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _apt_install(packages: Sequence[str], update_first: bool, say: Callable[[str], None]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Debian starts a package's service on install unless policy-rc.d says no; we do not want
    # a system haproxy/nginx/redis taking ports behind the benchmark's back.
    made_policy = False
    if not POLICY_RC_D.exists():
        with contextlib.suppress(OSError):
            POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
            POLICY_RC_D.chmod(0o755)
            made_policy = True
    try:
        if update_first:
            _run_apt(["apt-get", "update"], env)
        result = _run_apt(["apt-get", "install", "-y", "--no-install-recommends", *packages], env)
        if result != 0:
            say(f"apt-get install {' '.join(packages)} failed (exit {result})")
        return result == 0
    finally:
        if made_policy:
            with contextlib.suppress(OSError):
                POLICY_RC_D.unlink()


def _run_apt(argv: list[str], env: dict[str, str]) -> int:
    try:
        return subprocess.run(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=APT_TIMEOUT_S,
            check=False,
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return -1


def _first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (proc.stdout + proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _search(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else text


def peer_versions(status: PeerStatus) -> dict[str, str]:
    out: dict[str, str] = {}
    commands = {
        "haproxy": (["haproxy", "-v"], r"version (\S+)"),
        "nginx": (["nginx", "-v"], r"nginx/(\S+)"),
        "redis": (["redis-server", "--version"], r"v=(\S+)"),
        "iperf3": (["iperf3", "--version"], r"iperf (\S+)"),
    }
    for name, (argv, pattern) in commands.items():
        if status.available.get(name):
            binary = which(argv[0]) or argv[0]
            out[name] = _search(pattern, _first_line([binary, *argv[1:]]))
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _package_version(module: str) -> str:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str | int | float]:
    return {
        "cores": os.cpu_count() or 0,
        "cpu": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "uvloop": _package_version("uvloop"),
        "tcpproxy": _package_version("tcpproxy"),
        "nofile_limit": _nofile_hard(),
    }


def _nofile_hard() -> int:
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
