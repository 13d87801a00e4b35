"""Talking to the proxy under test: its admin API, and its process in /proc."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ADMIN_TIMEOUT_S = 10.0

# (metric sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class AdminError(RuntimeError):
    pass


class Admin:
    """The proxy's admin API. A new connection per request (no keep-alive), so that the fd
    count of the proxy does not depend on when we last asked it something."""

    def __init__(self, address: str) -> None:
        self.base = f"http://{address}"
        self.session: aiohttp.ClientSession | None = None
        self.errors: list[str] = []
        self.requests = 0

    async def __aenter__(self) -> Admin:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _get(self, path: str) -> tuple[int, str]:
        assert self.session is not None
        self.requests += 1
        try:
            async with self.session.get(self.base + path) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.errors.append(f"GET {path}: {type(exc).__name__}: {exc}")
            raise AdminError(self.errors[-1]) from exc

    async def status(self) -> dict[str, Any]:
        code, text = await self._get("/status")
        if code != 200:
            raise AdminError(f"GET /status: HTTP {code}")
        doc: dict[str, Any] = json.loads(text)
        return doc

    async def metrics(self) -> Samples:
        code, text = await self._get("/metrics")
        if code != 200:
            raise AdminError(f"GET /metrics: HTTP {code}")
        return parse_metrics(text)

    async def ready(self) -> bool:
        try:
            code, _ = await self._get("/readyz")
        except AdminError:
            self.errors.pop()  # not up yet is not an error
            return False
        return code == 200

    async def reload(self) -> tuple[int, dict[str, Any]]:
        assert self.session is not None
        self.requests += 1
        try:
            async with self.session.post(self.base + "/-/reload") as resp:
                return resp.status, await resp.json()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.errors.append(f"POST /-/reload: {type(exc).__name__}: {exc}")
            raise AdminError(self.errors[-1]) from exc


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def fd_targets(pid: int) -> dict[str, str]:
    """fd -> what it is (`socket:[INODE]`, a path, `anon_inode:[eventpoll]`...)."""
    out = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def fd_kinds(targets: dict[str, str]) -> dict[str, int]:
    """How many fds are sockets, pipes (the splice engine's pool) and anything else."""
    sockets = sum(1 for t in targets.values() if t.startswith("socket:"))
    pipes = sum(1 for t in targets.values() if t.startswith("pipe:"))
    return {
        "fds": len(targets),
        "sockets": sockets,
        "pipes": pipes,
        "other": len(targets) - sockets - pipes,
    }


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def _addr(hex_addr: str) -> str:
    ip, port = hex_addr.split(":")
    octets = [str(int(ip[i : i + 2], 16)) for i in range(6, -1, -2)]
    return f"{'.'.join(octets)}:{int(port, 16)}"


def describe_fds(pid: int, targets: dict[str, str]) -> list[str]:
    """Readable descriptions of fds: sockets as local -> remote and TCP state."""
    sockets: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            sockets[f[9]] = f"tcp {_addr(f[1])} -> {_addr(f[2])} {_TCP_STATES.get(f[3], f[3])}"
    out = []
    for fd, target in sorted(targets.items(), key=lambda kv: int(kv[0])):
        inode = target[len("socket:[") : -1] if target.startswith("socket:[") else None
        what = sockets.get(inode, target) if inode else target
        out.append(f"fd {fd}: {what}")
    return out


def threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
