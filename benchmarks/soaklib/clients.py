"""The soak's clients: the kinds of connection a real service sees, each checking every byte.

Every connection leaves a `ConnRecord`: where it went (the backend's greeting names the
backend and which start of its process), what it sent and got back, how much of that was
verified against the pattern, and how it ended as the client saw it. The ledger later joins
each record with the proxy's access-log line for the same client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from soaklib.pattern import mismatched, pattern, start_offset

HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0
READ_BYTES = 64 * 1024
# Slow readers shrink their receive buffer so that the proxy, not the kernel, holds the
# backlog: its flow control (pause reading the backend) is what is being exercised.
SLOW_RCVBUF_BYTES = 16 * 1024
PING_BYTES = 16
_LINGER_RESET = struct.pack("ii", 1, 0)

# How the client saw a connection end.
OK = "ok"
EARLY_EOF = "early_eof"  # the stream ended before everything came back
RESET = "reset"  # ECONNRESET / EPIPE we did not cause
REFUSED = "refused"
TIMEOUT = "timeout"  # the connection's time budget ran out: something hung
CLIENT_RESET = "client_reset"  # we reset it on purpose
ERROR = "error"  # any other OSError, or a protocol surprise


class EarlyEOF(Exception):
    pass


@dataclass
class ConnRecord:
    id: int
    kind: str
    listener: str
    port: int
    t_start: float  # monotonic
    t_end: float = 0.0
    t_greeting: float | None = None
    client: str | None = None  # our address as the proxy sees it, 127.0.0.1:PORT
    backend: str | None = None
    gen: int | None = None  # which start of the backend's process
    up: int = 0  # every byte we wrote
    down: int = 0  # every byte we read
    expected: int = 0  # payload bytes that should come back or be acknowledged
    verified: int = 0  # of those, checked equal to what was sent
    corrupted: int = 0  # bytes that came back different (or extra)
    outcome: str = "running"
    detail: str = ""
    intended_reset: bool = False
    half_closed: bool = False  # we sent FIN before we had everything back
    last_activity: float = 0.0  # last byte either way (monotonic)
    expect_close: str | None = None  # we wait for the proxy to close: idle_timeout, shutdown

    def to_json(self, t0: float) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("t_start", "t_end", "t_greeting", "last_activity"):
            if doc[key] is not None:
                doc[key] = round(doc[key] - t0, 3)
        return doc


@dataclass(frozen=True)
class LoadParams:
    stream_concurrency: int
    stream_life_s: tuple[float, float]
    stream_chunk_max: int
    stream_gap_s: float  # mean pause between a stream's writes
    bulk_concurrency: int
    bulk_bytes: tuple[int, int]
    rr_rate: float  # short request/response connections per second
    rr_cap: int  # at most this many in flight (a stalled proxy must not pile them up)
    rr_payload_max: int
    slow_concurrency: int
    slow_bytes: tuple[int, int]
    slow_read_bytes: int
    slow_tick_s: float
    slow_stall_s: float  # slow readers sometimes stop reading this long
    reset_rate: float
    idle_concurrency: int
    idle_long_fraction: float  # idle clients that wait for the idle timeout to close them
    aux_share: float  # share of new connections sent to the aux listener while it serves

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conn:
    """One client connection and its record."""

    load: Load
    rec: ConnRecord
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    @property
    def w(self) -> asyncio.StreamWriter:
        assert self.writer is not None
        return self.writer

    @property
    def r(self) -> asyncio.StreamReader:
        assert self.reader is not None
        return self.reader

    async def open(self, rcvbuf: int | None = None, limit: int = READ_BYTES) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # Before connect, so the window scale matches the small buffer.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await loop.sock_connect(sock, (HOST, self.rec.port))
            finally:
                # Our address even when the connect failed: the proxy may reset us before
                # sock_connect returns (its backend just died), and its log line must match.
                with contextlib.suppress(OSError):
                    host, port = sock.getsockname()[:2]
                    if port:
                        self.rec.client = f"{host}:{port}"
            self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            if self.writer is None:
                sock.close()
            raise
        self.rec.last_activity = self.load.now()

    async def greeting(self) -> None:
        line = await self.r.readline()
        self.rec.down += len(line)
        words = line.split()
        if not line.endswith(b"\n") or len(words) != 4 or words[:2] != [b"hello", b"from"]:
            raise EarlyEOF(f"no greeting (got {line[:60]!r})")
        self.rec.backend = words[2].decode()
        self.rec.gen = int(words[3])
        self.rec.t_greeting = self.rec.last_activity = self.load.now()

    def send(self, data: bytes) -> None:
        self.w.write(data)
        self.rec.up += len(data)
        self.rec.last_activity = self.load.now()

    def send_eof(self) -> None:
        self.w.write_eof()

    async def receive(
        self,
        base: int,
        limit: int | None = None,
        read_bytes: int = READ_BYTES,
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """Read pattern bytes from stream position `base` until EOF (or `limit` bytes),
        checking each; returns how many came."""
        rec = self.rec
        got = 0
        while limit is None or got < limit:  # ends at EOF, or by the connection's budget
            want = read_bytes if limit is None else min(read_bytes, limit - got)
            data = await self.r.read(want)
            if not data:
                break
            rec.down += len(data)
            rec.last_activity = self.load.now()
            bad = mismatched(data, base + got)
            rec.corrupted += bad
            rec.verified += len(data) - bad
            got += len(data)
            if pace is not None:
                await pace()
        return got

    async def expect_eof(self) -> None:
        rest = await self.r.read(READ_BYTES)
        if rest:
            self.rec.down += len(rest)
            self.rec.corrupted += len(rest)
            raise EarlyEOF(f"{len(rest)} unexpected bytes where EOF was due")

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), as a crashing or impatient client does."""
        self.rec.intended_reset = True
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.w.transport.abort()

    async def close(self) -> None:
        self.w.close()
        with contextlib.suppress(OSError):
            await self.w.wait_closed()


Body = Callable[[Conn], Awaitable[None]]


@dataclass
class Load:
    """Runs the clients and keeps their records."""

    params: LoadParams
    rng: random.Random
    # listener name -> port, for listeners serving now (as far as the soak has confirmed)
    serving: Callable[[], dict[str, int]]
    idle_timeout_s: float  # the main listener's
    records: list[ConnRecord] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    skipped: dict[str, int] = field(default_factory=dict)  # rate spawners over their cap
    held_ready: asyncio.Queue[int] = field(default_factory=asyncio.Queue)

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -- running one connection ------------------------------------------------------------

    def _pick(self, kind: str) -> tuple[str, int] | None:
        serving = self.serving()
        aux_ok = kind not in ("idle", "shutdown") and "aux" in serving
        if aux_ok and self.rng.random() < self.params.aux_share:
            return "aux", serving["aux"]
        if "main" in serving:
            return "main", serving["main"]
        return None

    def start(self, kind: str, body: Body, budget_s: float) -> asyncio.Task[None] | None:
        picked = self._pick(kind)
        if picked is None:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            return None
        rec = ConnRecord(len(self.records) + 1, kind, picked[0], picked[1], self.now())
        self.records.append(rec)
        task = asyncio.get_running_loop().create_task(self._run(Conn(self, rec), body, budget_s))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run(self, conn: Conn, body: Body, budget_s: float) -> None:
        rec = conn.rec
        try:
            async with asyncio.timeout(budget_s):
                await body(conn)
        except EarlyEOF as exc:
            rec.outcome, rec.detail = EARLY_EOF, str(exc)
        except ConnectionRefusedError:
            rec.outcome = REFUSED
        except (ConnectionResetError, BrokenPipeError) as exc:
            rec.outcome, rec.detail = RESET, f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            rec.outcome, rec.detail = TIMEOUT, f"budget {budget_s:.0f}s"
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            rec.outcome, rec.detail = ERROR, f"{type(exc).__name__}: {exc}"
        finally:
            rec.t_end = self.now()
            if conn.writer is not None and not conn.writer.transport.is_closing():
                conn.writer.transport.abort()
        if rec.outcome == "running":
            rec.outcome = ERROR
            rec.detail = "ended without an outcome"
        if rec.outcome == OK and rec.corrupted:
            rec.outcome = ERROR
            rec.detail = f"{rec.corrupted} corrupted bytes"

    # -- spawners ----------------------------------------------------------------------------

    async def keep(self, kind: str, n: int, body: Body, budget_s: float, stop_at: float) -> None:
        """Keep `n` connections of a kind open until `stop_at`."""
        mine: set[asyncio.Task[None]] = set()
        while self.now() < stop_at and n > 0:
            while len(mine) < n and self.now() < stop_at:
                task = self.start(kind, body, budget_s)
                if task is None:
                    break
                mine.add(task)
            if not mine:
                await asyncio.sleep(0.2)
                continue
            done, _ = await asyncio.wait(mine, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            mine -= done
            if done and self.now() < stop_at:
                # Stagger restarts a little, so that connections do not march in lockstep.
                await asyncio.sleep(self.rng.uniform(0, 0.2))

    async def at_rate(
        self, kind: str, rate: float, body: Body, *, cap: int, budget_s: float, stop_at: float
    ) -> None:
        """Start connections of a kind at a steady `rate` per second until `stop_at`."""
        if rate <= 0:
            return
        mine: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        next_at = self.now()
        while self.now() < stop_at:
            next_at += interval
            mine = {t for t in mine if not t.done()}
            if len(mine) < cap:
                task = self.start(kind, body, budget_s)
                if task is not None:
                    mine.add(task)
            else:
                self.skipped[kind] = self.skipped.get(kind, 0) + 1
            await asyncio.sleep(max(0.0, next_at - self.now()))

    async def wait_all(self, timeout_s: float) -> int:
        """Wait for every client to end (each has its own budget); returns how many did not."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout_s)
        left = len(self.tasks)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=5)
        return left

    # -- the kinds ---------------------------------------------------------------------------

    def stream(self, stop_at: float) -> Body:
        """Long-lived echo stream: writes at a varying pace for its lifetime, checks the echo
        as it comes, then FIN and checks that all of it came back."""
        p = self.params

        async def body(conn: Conn) -> None:
            rec = conn.rec
            rng = self.rng
            life = min(rng.uniform(*p.stream_life_s), max(0.5, stop_at - self.now()))
            await conn.open()
            await conn.greeting()
            conn.send(b"echo\n")
            base = start_offset(rec.id)
            sent = 0

            async def sender() -> None:
                nonlocal sent
                end = self.now() + life
                while self.now() < end:
                    n = rng.randint(1, p.stream_chunk_max)
                    conn.send(pattern(base + sent, n))
                    sent += n
                    rec.expected += n
                    await conn.w.drain()
                    await asyncio.sleep(rng.uniform(0, 2 * p.stream_gap_s))
                conn.send_eof()

            task = asyncio.get_running_loop().create_task(sender())
            try:
                got = await conn.receive(base)
            finally:
                if not task.done():
                    task.cancel()
                (sent_result,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(sent_result, BaseException) or got != sent:
                why = "" if not isinstance(sent_result, Exception) else f" ({sent_result!r})"
                raise EarlyEOF(f"echoed {got} of {sent} bytes{why}")
            if got > sent:
                rec.corrupted += got - sent
            rec.outcome = OK
            await conn.close()

        return body

    def bulk(self) -> Body:
        """A large upload (sink: the backend answers count + sha256) or download (push)."""
        p = self.params

        async def body(conn: Conn) -> None:
            rng = self.rng
            n = rng.randint(*p.bulk_bytes)
            if rng.random() < 0.5:
                await conn.open()
                await conn.greeting()
                await self._download(conn, n, half_close=rng.random() < 0.5)
            else:
                await self._upload(conn, n)

        return body

    async def _download(
        self,
        conn: Conn,
        n: int,
        half_close: bool,
        read_bytes: int = READ_BYTES,
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        rec = conn.rec
        base = start_offset(rec.id)
        conn.send(f"push {n} {base}\n".encode())
        rec.expected = n
        if half_close:
            conn.send_eof()
            rec.half_closed = True
        got = await conn.receive(base, read_bytes=read_bytes, pace=pace)
        if got < n:
            raise EarlyEOF(f"pushed {got} of {n} bytes")
        if got > n:
            rec.corrupted += got - n
        if not half_close:
            conn.send_eof()
        rec.outcome = OK
        await conn.close()

    async def _upload(self, conn: Conn, n: int) -> None:
        rec = conn.rec
        await conn.open()
        await conn.greeting()
        base = start_offset(rec.id)
        conn.send(b"sink\n")
        rec.expected = n
        digest = hashlib.sha256()
        sent = 0
        while sent < n:
            k = min(READ_BYTES, n - sent)
            data = pattern(base + sent, k)
            digest.update(data)
            conn.send(data)
            sent += k
            await conn.w.drain()
        conn.send_eof()
        await self._sink_reply(conn, n, digest.hexdigest())

    async def _sink_reply(self, conn: Conn, n: int, hexdigest: str) -> None:
        rec = conn.rec
        line = await conn.r.readline()
        rec.down += len(line)
        rec.last_activity = self.now()
        words = line.split()
        if not line.endswith(b"\n") or len(words) != 2:
            raise EarlyEOF(f"no sink reply (got {line[:60]!r})")
        count = int(words[0])
        if count != n:
            rec.verified += min(count, n)
            raise EarlyEOF(f"backend got {count} of {n} bytes")
        if words[1].decode() != hexdigest:
            rec.corrupted += n
            raise EarlyEOF("sha256 differs")
        rec.verified += n
        await conn.expect_eof()
        rec.outcome = OK
        await conn.close()

    def request(self) -> Body:
        """Short request/response: the whole request and FIN go out at once, before the
        greeting (so the proxy holds them while it connects), then the answer is checked."""
        p = self.params

        async def body(conn: Conn) -> None:
            rng = self.rng
            rec = conn.rec
            await conn.open()
            base = start_offset(rec.id)
            variant = rng.choice(("sink", "push", "echo"))
            n = rng.randint(0, p.rr_payload_max)
            rec.half_closed = True
            if variant == "sink":
                data = pattern(base, n)
                conn.send(b"sink\n" + data)
                conn.send_eof()
                rec.expected = n
                await conn.greeting()
                await self._sink_reply(conn, n, hashlib.sha256(data).hexdigest())
                return
            if variant == "push":
                await self._download_after_greeting(conn, n, base)
                return
            conn.send(b"echo\n" + pattern(base, n))
            conn.send_eof()
            rec.expected = n
            await conn.greeting()
            got = await conn.receive(base)
            if got != n:
                raise EarlyEOF(f"echoed {got} of {n} bytes")
            rec.outcome = OK
            await conn.close()

        return body

    async def _download_after_greeting(self, conn: Conn, n: int, base: int) -> None:
        rec = conn.rec
        conn.send(f"push {n} {base}\n".encode())
        conn.send_eof()
        rec.expected = n
        await conn.greeting()
        got = await conn.receive(base)
        if got != n:
            raise EarlyEOF(f"pushed {got} of {n} bytes")
        rec.outcome = OK
        await conn.close()

    def slow(self) -> Body:
        """A slow reader on a small receive buffer downloading a few MiB, sometimes stalling;
        half of them send FIN right after the request, as `nc -N` or an HTTP/1.0 client."""
        p = self.params

        async def body(conn: Conn) -> None:
            rng = self.rng

            async def pace() -> None:
                if rng.random() < 0.01:
                    await asyncio.sleep(rng.uniform(0.5, 1.0) * p.slow_stall_s)
                else:
                    await asyncio.sleep(p.slow_tick_s)

            await conn.open(rcvbuf=SLOW_RCVBUF_BYTES, limit=p.slow_read_bytes)
            await conn.greeting()
            n = rng.randint(*p.slow_bytes)
            await self._download(
                conn, n, rng.random() < 0.5, read_bytes=p.slow_read_bytes, pace=pace
            )

        return body

    def resetter(self) -> Body:
        """Clients that reset: at once (maybe before the proxy reached a backend), after the
        greeting, mid-upload, or mid-download with unread data."""

        async def body(conn: Conn) -> None:
            rng = self.rng
            rec = conn.rec
            variant = rng.choice(("immediate", "greeting", "echo", "push", "sink"))
            rec.detail = variant
            await conn.open()
            if variant == "immediate":
                conn.reset()
                rec.outcome = CLIENT_RESET
                return
            await conn.greeting()
            base = start_offset(rec.id)
            if variant == "echo":
                n = rng.randint(1, 256 * 1024)
                conn.send(b"echo\n" + pattern(base, n))
                await conn.receive(base, limit=rng.randint(1, min(n, 64 * 1024)))
            elif variant == "push":
                conn.send(f"push {64 * 1024 * 1024} {base}\n".encode())
                await conn.receive(base, limit=rng.randint(1, 1024 * 1024))
            elif variant == "sink":
                conn.send(b"sink\n" + pattern(base, rng.randint(1, 1024 * 1024)))
                await conn.w.drain()
            rec.expected = rec.verified  # what it chose to read back, checked
            conn.reset()
            rec.outcome = CLIENT_RESET

        return body

    def idle(self) -> Body:
        """Idle connections: a ping, a long silence, then another ping (shorter than the idle
        timeout) or a wait for the proxy to close it (longer)."""
        p = self.params
        idle_s = self.idle_timeout_s

        async def body(conn: Conn) -> None:
            rng = self.rng
            rec = conn.rec
            await conn.open()
            await conn.greeting()
            base = start_offset(rec.id)
            conn.send(b"echo\n" + pattern(base, PING_BYTES))
            rec.expected = PING_BYTES
            if await conn.receive(base, limit=PING_BYTES) != PING_BYTES:
                raise EarlyEOF("ping not echoed")
            if rng.random() >= p.idle_long_fraction:
                await asyncio.sleep(rng.uniform(0.1, 0.5) * idle_s)
                conn.send(pattern(base + PING_BYTES, PING_BYTES))
                rec.expected += PING_BYTES
                if await conn.receive(base + PING_BYTES, limit=PING_BYTES) != PING_BYTES:
                    raise EarlyEOF("second ping not echoed")
                conn.send_eof()
                await conn.expect_eof()
                rec.outcome = OK
                await conn.close()
                return
            rec.expect_close = "idle_timeout"
            await self._wait_closed(conn)

        return body

    def held(self) -> Body:
        """Held open (a ping, then silence) until the proxy closes it: for the shutdown."""

        async def body(conn: Conn) -> None:
            rec = conn.rec
            await conn.open()
            await conn.greeting()
            base = start_offset(rec.id)
            conn.send(b"echo\n" + pattern(base, PING_BYTES))
            rec.expected = PING_BYTES
            if await conn.receive(base, limit=PING_BYTES) != PING_BYTES:
                raise EarlyEOF("ping not echoed")
            rec.expect_close = "shutdown"
            self.held_ready.put_nowait(rec.id)
            await self._wait_closed(conn)

        return body

    async def _wait_closed(self, conn: Conn) -> None:
        data = await conn.r.read(1)  # bounded by the connection's budget
        if data:
            conn.rec.down += len(data)
            conn.rec.corrupted += len(data)
            raise EarlyEOF("unexpected data while idle")
        raise EarlyEOF("closed by the proxy")
