"""The process's own limits, checked at start: open files (raised to the hard limit, as
HAProxy does) and the cgroup memory limit, each against the configured max_connections.

The arithmetic and the cgroup parsing are pure functions; `check_at_start` does the I/O.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tcpproxy.config import ListenerConfig
from tcpproxy.relay import SMALL_READ_BYTES

log = logging.getLogger("tcpproxy")

# A relayed connection holds two descriptors: the client's socket and the backend's.
FDS_PER_CONNECTION = 2
# Descriptors beyond the connections: the interpreter and event loop, listening sockets,
# the acceptors' spare descriptors, the admin server and its connections, health checks,
# the config watcher and the splice engine's idle pipes.
FD_HEADROOM = 256
# The soft limit is raised to the hard limit, but no higher than this (HAProxy's default
# fd-hard-limit): a hard limit of a billion buys nothing.
FD_LIMIT_CAP = 1 << 20
# The most memory one connection can make the proxy hold in user space, for the check
# against the cgroup's memory limit: one small read held each way while both destinations
# are full (the copy engine), and its objects with room to spare (about 1.2 KiB measured).
# The kernel's socket buffers and the splice engine's pipes are not counted.
WORST_CASE_BYTES_PER_CONNECTION = 2 * SMALL_READ_BYTES + 32 * 1024

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712 with
# 4 KiB pages): anything at or past 2**62 bytes is no limit.
_V1_UNLIMITED_BYTES = 1 << 62


def total_max_connections(listeners: Iterable[ListenerConfig]) -> int:
    return sum(listener.max_connections for listener in listeners)


def fds_needed(max_connections: int) -> int:
    return FDS_PER_CONNECTION * max_connections + FD_HEADROOM


def raised_soft_limit(soft: int, hard: int) -> int:
    """The soft open-files limit to set: the hard one (capped), never lower than now."""
    target = FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        return target
    return soft


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard limit; return (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = raised_soft_limit(soft, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
        else:
            soft = target
    return soft, hard


def open_files_warning(soft: int, hard: int, listeners: Iterable[ListenerConfig]) -> str | None:
    """One line when `soft` descriptors cannot hold every listener's max_connections."""
    listeners = list(listeners)
    total = total_max_connections(listeners)
    needed = fds_needed(total)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    fits = max(0, (soft - FD_HEADROOM) // FDS_PER_CONNECTION)
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return (
        f"open files limit {soft} (hard limit {hard_text}) is too low for max_connections "
        f"{_sum_text(listeners, total)}: {needed} descriptors needed ({FDS_PER_CONNECTION} per "
        f"connection + {FD_HEADROOM}), so only about {fits} connections fit; raise the hard "
        "limit (ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=) or lower "
        "max_connections"
    )


# -- the cgroup memory limit --


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    limit_bytes: int
    source: Path  # the file that set it


def parse_limit_value(text: str) -> int | None:
    """Bytes from a cgroup limit file (v2 memory.max, v1 memory.limit_in_bytes); None for no
    limit or for text that is not a limit."""
    value = text.strip()
    if value == "max":
        return None
    if not value.isascii() or not value.isdigit():
        return None
    limit = int(value)
    return None if limit >= _V1_UNLIMITED_BYTES else limit


def cgroup_paths(proc_self_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _candidates(mount: Path, path: str | None) -> list[Path]:
    """The cgroup directory of `path` under `mount` and each of its ancestors up to the
    mount: a limit anywhere above a cgroup applies to it too. In a container with its own
    cgroup namespace the process's path is "/" and the mount is its cgroup."""
    dirs = [mount]
    if path:
        current = mount
        for part in Path(path).parts[1:]:
            current = current / part
            dirs.append(current)
    return dirs


def memory_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> MemoryLimit | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v2, else v1),
    or None when there is none or it cannot be read."""
    try:
        membership = proc_self_cgroup.read_text()
    except OSError:
        membership = ""
    v2_path, v1_path = cgroup_paths(membership)
    found: list[MemoryLimit] = []
    searches = (
        (cgroup_root, v2_path, "memory.max"),
        (cgroup_root / "memory", v1_path, "memory.limit_in_bytes"),
    )
    for mount, path, name in searches:
        for directory in _candidates(mount, path):
            file = directory / name
            try:
                text = file.read_text()
            except OSError:
                continue
            limit = parse_limit_value(text)
            if limit is not None:
                found.append(MemoryLimit(limit, file))
        if found:
            break  # v2 found a limit: v1 files (a hybrid mount) are not consulted
    return min(found, key=lambda m: m.limit_bytes) if found else None


def memory_warning(limit: MemoryLimit | None, listeners: Iterable[ListenerConfig]) -> str | None:
    """One line when every listener's max_connections at their worst would not fit."""
    if limit is None:
        return None
    listeners = list(listeners)
    total = total_max_connections(listeners)
    worst = total * WORST_CASE_BYTES_PER_CONNECTION
    if worst <= limit.limit_bytes:
        return None
    fits = limit.limit_bytes // WORST_CASE_BYTES_PER_CONNECTION
    return (
        f"max_connections {_sum_text(listeners, total)} could take {_mib(worst)} "
        f"({WORST_CASE_BYTES_PER_CONNECTION // 1024} KiB per connection at worst), more than "
        f"the memory limit of {_mib(limit.limit_bytes)} ({limit.source}): about {fits} "
        "connections fit; lower max_connections or raise the memory limit"
    )


def _sum_text(listeners: list[ListenerConfig], total: int) -> str:
    if len(listeners) == 1:
        return f"{total} (listener {listeners[0].name})"
    parts = ", ".join(f"{lst.name} {lst.max_connections}" for lst in listeners)
    return f"{total} (all listeners: {parts})"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def check_at_start(listeners: Iterable[ListenerConfig]) -> None:
    """Log one warning line for each limit too low for the configured max_connections.
    (The open files limit is raised first, by `raise_open_files_limit`.)"""
    listeners = list(listeners)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lines = (open_files_warning(soft, hard, listeners), memory_warning(memory_limit(), listeners))
    for line in lines:
        if line is not None:
            log.warning("%s", line, extra={"reason": "limits"})
