"""Load client for the benchmark workloads that no Debian tool covers well.

Run as a separate process (``python loadclient.py MODE ...``) so that its CPU time is its own
and several copies can run side by side. It speaks just enough of the Redis protocol to talk to
``redis-server``: the backend is C, so the only Python on the path is the client and, when it
is the target, tcpproxy. It prints one JSON object on stdout.

Modes:

``conn``     new connections per second: connect, one short request, read the reply, close.
             With ``--close server`` (default) the request is ``QUIT`` and the server closes
             first, as an HTTP/1.0 server would. With ``--close client`` the request is ``PING``
             and the client closes: every connect then has to step over the client's own
             TIME_WAIT sockets in the kernel's port search (``__inet_check_established`` in a
             profile), which caps even a direct connection at ~14k/s on a 2-core VM, so that
             regime measures the kernel rather than the proxy.
``latency``  request/response latency at a fixed rate over a few kept-alive connections.
``idle``     open N connections, make one round trip on each so that the whole path is
             established, print ``READY``, hold them until a line arrives on stdin, close.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import sys
import time
from typing import Any, cast

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - the venv has it
    HAVE_UVLOOP = False

HOST = "127.0.0.1"
PING = b"PING\r\n"
PONG = b"+PONG\r\n"
QUIT = b"QUIT\r\n"
OK = b"+OK\r\n"

CONNECT_TIMEOUT_S = 5.0
IDLE_HOLD_MAX_S = 600.0
PAUSE_AFTER_ERROR_S = 0.001


def _raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class _OneShot(asyncio.Protocol):
    """One request, read to the expected reply (and to EOF when the server closes)."""

    def __init__(self, request: bytes, reply: bytes, wait_eof: bool, done: asyncio.Future[bool]):
        self._request = request
        self._reply = reply
        self._wait_eof = wait_eof
        self._done = done
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._wait_eof and self._buf == self._reply and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(exc is None and self._buf == self._reply)


async def _conn_worker(port: int, close: str, end: float, stats: dict[str, float]) -> None:
    loop = asyncio.get_running_loop()
    if close == "server":
        request, reply, wait_eof = QUIT, OK, True
    else:
        request, reply, wait_eof = PING, PONG, False
    while time.monotonic() < end:
        done: asyncio.Future[bool] = loop.create_future()

        def factory(done: asyncio.Future[bool] = done) -> _OneShot:
            return _OneShot(request, reply, wait_eof, done)

        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await loop.create_connection(factory, HOST, port)
                good = await done
        except (OSError, TimeoutError):
            good = False
        if good:
            stats["ok"] += 1
            stats["last"] = time.monotonic()
        else:
            stats["errors"] += 1
            await asyncio.sleep(PAUSE_AFTER_ERROR_S)


async def run_conn(args: argparse.Namespace) -> dict[str, Any]:
    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.monotonic()
    end = start + args.duration
    stats: dict[str, float] = {"ok": 0, "errors": 0, "last": start}
    await asyncio.gather(
        *(_conn_worker(args.port, args.close, end, stats) for _ in range(args.concurrency))
    )
    elapsed = max(stats["last"] - start, 1e-9)
    return {
        "ok": int(stats["ok"]),
        "errors": int(stats["errors"]),
        "elapsed_s": elapsed,
        "rate": stats["ok"] / elapsed,
    }


class _Pinger(asyncio.Protocol):
    """A kept-alive connection; replies come back in order, so a FIFO of send times suffices."""

    def __init__(self, samples: list[int]) -> None:
        self.sent: collections.deque[int] = collections.deque()
        self._samples = samples
        self._buf = b""
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.replied: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.idle = asyncio.Event()  # no request waiting for its reply
        self.idle.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self) -> None:
        assert self.transport is not None
        self.idle.clear()
        self.sent.append(time.perf_counter_ns())
        self.transport.write(PING)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self._buf += data
        while self._buf.startswith(PONG):
            self._buf = self._buf[len(PONG) :]
            if self.sent:
                self._samples.append(now - self.sent.popleft())
        if not self.sent:
            self.idle.set()
        if not self.replied.done():
            self.replied.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.idle.set()
        if not self.replied.done():
            self.replied.set_result(False)


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


async def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    samples: list[int] = []
    conns: list[_Pinger] = []
    for _ in range(args.connections):
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _t, proto = await loop.create_connection(lambda: _Pinger(samples), HOST, args.port)
        conns.append(proto)
    # Warm the path (first-use allocations in every hop) before measuring.
    for c in conns:
        c.send()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        await asyncio.gather(*(c.replied for c in conns))
    samples.clear()

    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    start = time.monotonic()
    sent = 0
    # Timers have ~1 ms resolution: on each wake, send everything that is due.
    while sent < total:
        now = time.monotonic()
        due = min(total, int((now - start) / interval) + 1)
        while sent < due:
            conns[sent % len(conns)].send()
            sent += 1
        if any(c.lost for c in conns):
            break
        await asyncio.sleep(max(0.0, start + sent * interval - time.monotonic()))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            for c in conns:
                await c.idle.wait()
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    values = sorted(samples)
    return {
        "sent": sent,
        "received": len(values),
        "p50_us": _percentile(values, 0.50) / 1000.0,
        "p90_us": _percentile(values, 0.90) / 1000.0,
        "p99_us": _percentile(values, 0.99) / 1000.0,
        "max_us": (values[-1] / 1000.0) if values else float("nan"),
    }


async def _open_idle(port: int, sem: asyncio.Semaphore, out: list[asyncio.Transport]) -> bool:
    loop = asyncio.get_running_loop()
    async with sem:
        samples: list[int] = []
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, proto = await loop.create_connection(
                    lambda: _Pinger(samples), HOST, port
                )
                out.append(transport)
                proto.send()
                return await proto.replied
        except (OSError, TimeoutError):
            return False


async def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    limit = _raise_nofile()
    count = min(args.count, limit - 64)
    transports: list[asyncio.Transport] = []
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    results = await asyncio.gather(*(_open_idle(args.port, sem, transports) for _ in range(count)))
    ok = sum(1 for r in results if r)
    opened_s = time.monotonic() - t0
    print("READY " + json.dumps({"ok": ok, "requested": args.count}), flush=True)
    try:
        async with asyncio.timeout(IDLE_HOLD_MAX_S):
            await loop.run_in_executor(None, sys.stdin.readline)
    except TimeoutError:
        pass
    alive = sum(1 for t in transports if not t.is_closing())
    for t in transports:
        t.close()
    await asyncio.sleep(0.05)
    return {"ok": ok, "alive_at_close": alive, "open_s": opened_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("conn")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--duration", type=float, default=2.0)
    c.add_argument("--start-at", type=float, default=0.0, help="wall-clock start (epoch s)")
    c.add_argument("--close", choices=("server", "client"), default="server")
    lat = sub.add_parser("latency")
    lat.add_argument("--port", type=int, required=True)
    lat.add_argument("--rate", type=float, default=1000.0)
    lat.add_argument("--duration", type=float, default=2.0)
    lat.add_argument("--connections", type=int, default=10)
    idle = sub.add_parser("idle")
    idle.add_argument("--port", type=int, required=True)
    idle.add_argument("--count", type=int, default=1000)
    idle.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args(argv)

    runners = {"conn": run_conn, "latency": run_latency, "idle": run_idle}
    coro = runners[args.mode](args)
    result = uvloop.run(coro) if HAVE_UVLOOP else asyncio.run(coro)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
