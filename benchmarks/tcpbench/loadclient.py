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
``blocked``  both directions blocked, to a ``flood`` backend: open W warm-up connections and
             fill them: send on each, never reading, until no send and no receive queue has
             moved for a while and the proxy's RSS is stable; print ``WARMED``, wait for a
             line on stdin; open N more and fill them the same way, print ``READY``, hold all
             of them until a line arrives on stdin, close. The warm-up ones stay open: the
             proxy has nothing to release between the two RSS readings.
``flood``    the backend for ``blocked``: accept, send on every connection whenever it is
             writable, never read; exit when the process that started it is gone.

``blocked`` and ``flood`` use raw non-blocking sockets with 4 KiB buffers and an MSS of 1460,
as an Internet peer would have. With loopback's 64 KiB MSS the proxy's send buffer towards
a peer that never reads grows to tcp_wmem's maximum (4 MiB here) and takes in whatever the
proxy would hold; with 1460 it stays at about 100 KiB (ss -m), so what does not fit stays in
the proxy, the case to size memory for. It also keeps the kernel memory of one blocked path
(six sockets) to about 0.5 MiB instead of about 17 MiB (/proc/net/sockstat), which lets N be
hundreds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import json
import os
import resource
import select
import selectors
import socket
import sys
import termios
import time
from pathlib import Path
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

# blocked / flood
PEER_MSS = 1460
PEER_BUF_BYTES = 4096  # SO_SNDBUF and SO_RCVBUF (the kernel doubles them)
SEND_CHUNK = b"x" * 65536
POLL_S = 0.1  # how often `blocked` retries its sends and reads the queues and the RSS
FLOOD_PARENT_CHECK_S = 1.0
FLOOD_BACKLOG = 4096
WOULD_BLOCK = (BlockingIOError, InterruptedError)


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


# --- blocked and flood: raw non-blocking sockets, no event loop -------------------------------


def _peer_socket(args: argparse.Namespace) -> socket.socket:
    """A TCP socket with the MSS and buffer sizes asked for (0: the kernel's), set before
    connect or listen."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if args.mss:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, args.mss)
    if args.sndbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    if args.rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    return s


def _vmrss_kib(pids: list[int]) -> int:
    """VmRSS summed over pids (this script runs standalone, so not tcpbench.procs')."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _tcp_mem_pages() -> int:
    """The kernel's TCP memory in use, all sockets of the machine (/proc/net/sockstat)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


def _tcp_mem_low_pages() -> int:
    """tcp_mem's first threshold: below it the kernel puts no pressure on any socket."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class _Blocked:
    """One connection of `blocked`, as the client sees it: bytes it sent, bytes it never read."""

    __slots__ = ("blocked", "dead", "inq", "sent", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.inq = 0
        self.blocked = False  # a send found the path full
        self.dead = False

    def pump(self) -> bool:
        """Send until the socket takes no more; read the receive queue. Any progress?"""
        if self.dead:
            return False
        progress = False
        try:
            while True:
                self.sent += self.sock.send(SEND_CHUNK)
                progress = True
        except WOULD_BLOCK:
            self.blocked = True
        except OSError:
            self.dead = True
            return True
        inq = int.from_bytes(fcntl.ioctl(self.sock, termios.FIONREAD, b"\0\0\0\0"), "little")
        if inq != self.inq:
            self.inq = inq
            progress = True
        return progress

    @property
    def full(self) -> bool:
        return self.dead or (self.blocked and self.inq > 0)


def _open_blocked(args: argparse.Namespace, count: int) -> list[_Blocked]:
    conns: list[_Blocked] = []
    for _ in range(count):
        s = _peer_socket(args)
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect((HOST, args.port))
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        conns.append(_Blocked(s))
    return conns


def _fill(conns: list[_Blocked], args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    """Pump every connection until nothing moves for --quiet s and the RSS is as stable."""
    budget = int(_tcp_mem_low_pages() * args.tcp_mem_share)
    start = time.monotonic()
    last_progress = start
    rss: collections.deque[tuple[float, int]] = collections.deque()
    settled = False
    why = "timeout"
    while True:
        now = time.monotonic()
        moved = [c.pump() for c in conns]
        if any(moved):
            last_progress = now
        rss.append((now, _vmrss_kib(pids)))
        while len(rss) > 1 and rss[1][0] <= now - args.quiet:
            rss.popleft()
        values = [v for _t, v in rss]
        rss_stable = rss[0][0] <= now - args.quiet and max(values) - min(values) <= args.rss_tol
        if all(c.full for c in conns) and now - last_progress >= args.quiet and rss_stable:
            settled, why = True, "settled"
            break
        if budget and _tcp_mem_pages() > budget:
            why = f"kernel TCP memory above {args.tcp_mem_share:.0%} of tcp_mem's low threshold"
            break
        if now - start > args.timeout:
            break
        time.sleep(POLL_S)
    n = max(1, len(conns))
    return {
        "settled": settled,
        "why": why,
        "settle_s": round(time.monotonic() - start, 2),
        "dead": sum(1 for c in conns if c.dead),
        "sent_kib_per_conn": round(sum(c.sent for c in conns) / n / 1024, 1),
        "unread_kib_per_conn": round(sum(c.inq for c in conns) / n / 1024, 1),
    }


def _close_all(conns: list[_Blocked]) -> None:
    for c in conns:
        c.sock.close()


def _wait_line(timeout: float) -> None:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if ready:
        sys.stdin.readline()


def run_blocked(args: argparse.Namespace) -> dict[str, Any]:
    limit = _raise_nofile()
    pids = [int(p) for p in args.rss_pids.split(",") if p]
    warm = _open_blocked(args, args.warm)
    warmed = _fill(warm, args, pids)
    print("WARMED " + json.dumps({"ok": len(warm), **warmed}), flush=True)
    _wait_line(IDLE_HOLD_MAX_S)

    count = min(args.count, limit - 64 - len(warm))
    mem0 = _tcp_mem_pages()
    t0 = time.monotonic()
    conns = _open_blocked(args, count)
    opened_s = time.monotonic() - t0
    filled = _fill(warm + conns, args, pids)
    kernel = (_tcp_mem_pages() - mem0) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    report = {
        "ok": len(conns),
        "requested": args.count,
        "open_s": round(opened_s, 2),
        "kernel_tcp_kib_per_conn": round(kernel / max(1, len(conns)), 1),
        **filled,
    }
    print("READY " + json.dumps(report), flush=True)
    _wait_line(IDLE_HOLD_MAX_S)
    _close_all(warm + conns)
    return report


def run_flood(args: argparse.Namespace) -> dict[str, Any]:
    """Accept; send on every connection whenever it is writable; never read."""
    _raise_nofile()
    parent = os.getppid()
    listener = _peer_socket(args)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, args.port))
    listener.listen(FLOOD_BACKLOG)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    accepted = 0
    while os.getppid() == parent:
        for key, _events in sel.select(FLOOD_PARENT_CHECK_S):
            sock = cast(socket.socket, key.fileobj)
            if sock is listener:
                with contextlib.suppress(*WOULD_BLOCK, ConnectionAbortedError):
                    while True:
                        conn, _addr = listener.accept()
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_WRITE)
                        accepted += 1
                continue
            try:
                while True:
                    sock.send(SEND_CHUNK)
            except WOULD_BLOCK:
                pass
            except OSError:  # reset or closed by the proxy: that connection is over
                sel.unregister(sock)
                sock.close()
    return {"accepted": accepted}


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
    blk = sub.add_parser("blocked")
    blk.add_argument("--port", type=int, required=True)
    blk.add_argument("--count", type=int, default=100)
    blk.add_argument("--warm", type=int, default=10, help="warm-up connections, filled first")
    blk.add_argument("--rss-pids", default="", help="the proxy's pids, comma-separated")
    blk.add_argument("--quiet", type=float, default=1.0, help="seconds with nothing moving")
    blk.add_argument("--rss-tol", type=int, default=64, help="KiB of RSS change still stable")
    blk.add_argument("--timeout", type=float, default=60.0, help="give up settling after this")
    blk.add_argument(
        "--tcp-mem-share",
        type=float,
        default=0.5,
        help="stop if the kernel's TCP memory passes this share of tcp_mem's low threshold",
    )
    fl = sub.add_parser("flood")
    fl.add_argument("--port", type=int, required=True)
    for p in (blk, fl):
        p.add_argument("--mss", type=int, default=PEER_MSS, help="TCP_MAXSEG, 0: the kernel's")
        p.add_argument("--sndbuf", type=int, default=PEER_BUF_BYTES, help="SO_SNDBUF, 0: auto")
        p.add_argument("--rcvbuf", type=int, default=PEER_BUF_BYTES, help="SO_RCVBUF, 0: auto")
    args = parser.parse_args(argv)

    sync_runners = {"blocked": run_blocked, "flood": run_flood}
    if args.mode in sync_runners:
        print(json.dumps(sync_runners[args.mode](args)), flush=True)
        return 0
    runners = {"conn": run_conn, "latency": run_latency, "idle": run_idle}
    coro = runners[args.mode](args)
    result = uvloop.run(coro) if HAVE_UVLOOP else asyncio.run(coro)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
