"""The soak's clients: the kinds of connection a real service sees, each checking every byte.

Every connection leaves a `ConnRecord`: where it went (the backend's greeting names the
backend and which start of its process), what it sent and got back, how much of that was
verified against the pattern, and how it ended as the client saw it. The ledger later joins
each record with the proxy's access-log line for the same client address.

The hostile kinds (`HOSTILE_VARIANTS`: slow readers under a short idle timeout, early replies
followed by resets, resets after half-closes) run on the `TIGHT` listeners over raw sockets,
so that the client sees exactly what the kernel saw: bytes, then a clean EOF or a reset, in
that order. Each record says which proxy end reason (`want_end`) and client outcome
(`want_outcome`) mean it went right, and what went wrong if not (`problem`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import random
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from soaklib.pattern import mismatched, pattern, start_offset
from soaklib.routes import TIGHT

HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0
READ_BYTES = 64 * 1024
COMMAND_LINE_MAX = 256
# Slow readers shrink their receive buffer so that the proxy, not the kernel, holds the
# backlog: its flow control (pause reading the backend) is what is being exercised.
SLOW_RCVBUF_BYTES = 16 * 1024
PING_BYTES = 16
_LINGER_RESET = struct.pack("ii", 1, 0)

# The hostile kinds and their variants, run in turn (each on each TIGHT listener in turn).
HOSTILE_VARIANTS: dict[str, tuple[str, ...]] = {
    # slow readers under the idle timeout: reading to the end, or stopping until closed
    "slowidle": ("reading", "reading", "stall"),
    # the backend answers part of an upload and resets while the client keeps uploading
    "early": ("upload",),
    # the client half-closes then resets (at once, or once its FIN reached the backend);
    # the backend half-closes then resets
    "hcreset": ("client_now", "client_ack", "backend"),
}
SLOWIDLE_READ_BYTES = (2048, 4096, 8192)
# Far more than every buffer between the backend and a stalled reader holds: its stream
# cannot end before the idle timeout does.
STALL_PUSH_BYTES = 64 * 1024 * 1024
EARLY_UPLOAD_MAX_BYTES = 64 * 1024 * 1024
# Read gaps (no byte either way) at least this long are kept: the ledger tells an idle close
# that was due from one that cut a client which was still reading.
SILENCE_MIN_S = 0.2
LOG_POLL_S = 0.05  # how often a client looks for its access-log line (the tail reads 4/s)
KERNEL_POLL_S = 0.002
KERNEL_POLLS = 2500  # 5 s at most for the kernel to acknowledge what we sent
TCP_CLOSE = 7  # tcpi_state after a reset (a socket that got FIN stays CLOSE_WAIT, 8)

# How the client saw a connection end.
OK = "ok"
EARLY_EOF = "early_eof"  # the stream ended before everything came back
RESET = "reset"  # ECONNRESET / EPIPE we did not cause
REFUSED = "refused"
TIMEOUT = "timeout"  # the connection's time budget ran out: something hung
CLIENT_RESET = "client_reset"  # we reset it on purpose
EXPECTED_RESET = "expected_reset"  # reset, as due, after every byte that was due
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
    # Hostile kinds only:
    variant: str = ""
    want_end: str | None = None  # the access-log end it must get (None: any but a cut)
    want_outcome: str | None = None  # what the client must see
    problem: str = ""  # what went wrong, as the client saw it (the ledger's cause)
    # Gaps of at least SILENCE_MIN_S with no byte either way: (from, to), monotonic.
    silences: list[tuple[float, float]] = field(default_factory=list)

    def to_json(self, t0: float) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("t_start", "t_end", "t_greeting", "last_activity"):
            if doc[key] is not None:
                doc[key] = round(doc[key] - t0, 3)
        doc["silences"] = [[round(a - t0, 3), round(b - t0, 3)] for a, b in self.silences]
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
    # Hostile patterns, on the TIGHT listeners:
    slowidle_concurrency: int
    slowidle_life_s: tuple[float, float]  # how long a reading one takes, at its own pace
    slowidle_tick_s: tuple[float, float]  # its pause between small reads (<< idle timeout)
    early_rate: float
    early_read_max: int  # the backend answers after this many upload bytes at most
    early_reply_max: int
    hcreset_rate: float
    hcreset_bytes_max: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conn:
    """One client connection and its record."""

    load: Load
    rec: ConnRecord
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    sock: socket.socket | None = None  # the hostile kinds' raw socket
    rbuf: bytes = b""  # raw bytes read past the greeting

    @property
    def w(self) -> asyncio.StreamWriter:
        assert self.writer is not None
        return self.writer

    @property
    def r(self) -> asyncio.StreamReader:
        assert self.reader is not None
        return self.reader

    async def open(self, rcvbuf: int | None = None, limit: int = READ_BYTES) -> None:
        sock = await self._connect(rcvbuf)
        try:
            self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise

    async def _connect(self, rcvbuf: int | None) -> socket.socket:
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
        except BaseException:
            sock.close()
            raise
        self.rec.last_activity = self.load.now()
        return sock

    # -- raw sockets (the hostile kinds) --

    async def open_raw(self, rcvbuf: int | None = None) -> None:
        self.sock = await self._connect(rcvbuf)

    @property
    def s(self) -> socket.socket:
        assert self.sock is not None
        return self.sock

    def touch(self) -> None:
        """A byte moved either way: note the gap since the last one if it was long."""
        now = self.load.now()
        if now - self.rec.last_activity >= SILENCE_MIN_S:
            self.rec.silences.append((self.rec.last_activity, now))
        self.rec.last_activity = now

    async def raw_send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.s, data)
        self.rec.up += len(data)
        self.touch()

    def raw_shut(self) -> None:
        """FIN: half-close."""
        self.s.shutdown(socket.SHUT_WR)

    def raw_reset(self) -> None:
        self.rec.intended_reset = True
        sock, self.sock = self.s, None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()

    async def _recv(self, n: int) -> bytes:
        if self.rbuf:
            data, self.rbuf = self.rbuf[:n], self.rbuf[n:]
            return data
        data = await asyncio.get_running_loop().sock_recv(self.s, n)
        if data:
            self.rec.down += len(data)
            self.touch()
        return data

    async def raw_line(self) -> bytes:
        """One line (the greeting, an ack); what follows it stays in rbuf."""
        buf = b""
        while b"\n" not in buf and len(buf) <= COMMAND_LINE_MAX:  # ends at EOF or the budget
            data = await self._recv(COMMAND_LINE_MAX)
            if not data:
                break
            buf += data
        line, nl, rest = buf.partition(b"\n")
        self.rbuf = rest + self.rbuf
        return line + nl

    async def raw_greeting(self) -> None:
        line = await self.raw_line()
        self._parse_greeting(line)

    def _parse_greeting(self, line: bytes) -> None:
        words = line.split()
        if not line.endswith(b"\n") or len(words) != 4 or words[:2] != [b"hello", b"from"]:
            raise EarlyEOF(f"no greeting (got {line[:60]!r})")
        self.rec.backend = words[2].decode()
        self.rec.gen = int(words[3])
        self.rec.t_greeting = self.rec.last_activity = self.load.now()

    async def read_pattern(
        self, base: int, limit: int | None, read_bytes: int = READ_BYTES, tick: float = 0.0
    ) -> tuple[int, str]:
        """Read pattern bytes from stream position `base`, checking each, until EOF, a reset or
        `limit` bytes (with a pause of `tick` after each read): (bytes, eof|reset|limit)."""
        rec = self.rec
        got = 0
        while limit is None or got < limit:  # ends at EOF, a reset, or by the budget
            want = read_bytes if limit is None else min(read_bytes, limit - got)
            try:
                data = await self._recv(want)
            except ConnectionResetError:
                return got, "reset"
            if not data:
                return got, "eof"
            bad = mismatched(data, base + got)
            rec.corrupted += bad
            rec.verified += len(data) - bad
            got += len(data)
            if tick:
                await asyncio.sleep(tick)
        return got, "limit"

    async def read_end(self) -> str:
        """After the last byte due: eof or reset; any byte still coming is corrupt."""
        while True:  # ends at EOF, a reset, or by the budget
            try:
                data = await self._recv(READ_BYTES)
            except ConnectionResetError:
                return "reset"
            if not data:
                return "eof"
            self.rec.corrupted += len(data)

    def tcp_state(self) -> int:
        return self.s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

    async def sent_all(self) -> None:
        """Until the peer acknowledged every byte (and FIN) we sent: a reset now discards
        nothing of ours in our kernel."""
        for _ in range(KERNEL_POLLS):
            outq = struct.unpack("i", fcntl.ioctl(self.s.fileno(), termios.TIOCOUTQ, b"\0" * 4))
            if outq[0] == 0:
                return
            await asyncio.sleep(KERNEL_POLL_S)

    async def greeting(self) -> None:
        line = await self.r.readline()
        self.rec.down += len(line)
        self._parse_greeting(line)

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
    # The end reason in the proxy's access log of the connection from a client address
    # opened after a time (monotonic), once the line is in; None before.
    # (listener, client, opened after, logged after): the end reason in the proxy's access log.
    logged: Callable[[str, str, float, float | None], str | None] = lambda _l, _c, _s, _a: None
    records: list[ConnRecord] = field(default_factory=list)
    turns: dict[str, int] = field(default_factory=dict)  # hostile kinds started so far
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    skipped: dict[str, int] = field(default_factory=dict)  # rate spawners over their cap
    held_ready: asyncio.Queue[int] = field(default_factory=asyncio.Queue)

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -- running one connection ------------------------------------------------------------

    def _pick(self, kind: str) -> tuple[str, int, str] | None:
        """(listener, port, variant) for a new connection of a kind."""
        serving = self.serving()
        variants = HOSTILE_VARIANTS.get(kind)
        if variants is not None:
            # Every variant on every TIGHT listener (engine) in turn.
            turn = self.turns.get(kind, 0)
            self.turns[kind] = turn + 1
            name = TIGHT[(turn // len(variants)) % len(TIGHT)]
            if name not in serving:
                return None
            return name, serving[name], variants[turn % len(variants)]
        aux_ok = kind not in ("idle", "shutdown") and "aux" in serving
        if aux_ok and self.rng.random() < self.params.aux_share:
            return "aux", serving["aux"], ""
        if "main" in serving:
            return "main", serving["main"], ""
        return None

    def start(self, kind: str, body: Body, budget_s: float) -> asyncio.Task[None] | None:
        picked = self._pick(kind)
        if picked is None:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            return None
        rec = ConnRecord(len(self.records) + 1, kind, picked[0], picked[1], self.now())
        rec.variant = picked[2]
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
            if conn.sock is not None:
                conn.sock.close()
        if rec.outcome == "running":
            rec.outcome = ERROR
            rec.detail = "ended without an outcome"
        if rec.outcome in (OK, EXPECTED_RESET) and rec.corrupted:
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

    # -- the hostile kinds (TIGHT listeners, raw sockets) -------------------------------------

    async def _until_logged(
        self, conn: Conn, polls: int = 1_000_000, open_at: float | None = None
    ) -> str | None:
        """Poll for this connection's access-log line (the proxy is done with it): its end
        reason, or None after `polls` looks (else bounded by the connection's budget).
        `open_at` (monotonic): a moment the connection was surely still open."""
        rec = conn.rec
        assert rec.client is not None
        for _ in range(polls):
            end = self.logged(rec.listener, rec.client, rec.t_start, open_at)
            if end is not None:
                return end
            await asyncio.sleep(LOG_POLL_S)
        return None

    def slowidle(self) -> Body:
        """A slow reader on a listener with a short idle timeout: a small receive buffer, small
        reads with pauses far below the timeout, so that bytes keep moving though the proxy
        only ever waits for the client to take them. `reading` reads a pushed stream to its
        end: it must get every byte and never be closed as idle. `stall` stops reading after
        a while and waits for the proxy to close it (its access-log line), then reads on: the
        idle close must be a reset, never a clean EOF that would pass a cut stream for whole."""
        p = self.params

        async def body(conn: Conn) -> None:
            rng = self.rng
            rec = conn.rec
            await conn.open_raw(rcvbuf=SLOW_RCVBUF_BYTES)
            await conn.raw_greeting()
            base = start_offset(rec.id)
            read_bytes = rng.choice(SLOWIDLE_READ_BYTES)
            tick = rng.uniform(*p.slowidle_tick_s)
            rate = read_bytes / tick
            half_close = rng.random() < 0.5
            pace = f"{read_bytes} B every {tick * 1000:.0f} ms ({rate / 1024:.0f} KiB/s)"
            if rec.variant == "stall":
                await self._stalled_reader(
                    conn,
                    base=base,
                    read_bytes=read_bytes,
                    tick=tick,
                    half_close=half_close,
                    pace=pace,
                )
                return
            rec.want_outcome = OK
            n = int(rate * rng.uniform(*p.slowidle_life_s))
            rec.detail = f"{pace}, {n} B"
            await conn.raw_send(f"push {n} {base}\n".encode())
            rec.expected = n
            if half_close:
                conn.raw_shut()
                rec.half_closed = True
            got, how = await conn.read_pattern(base, n, read_bytes, tick)
            if how == "reset":
                raise ConnectionResetError(f"reset after {got} of {n} bytes ({pace})")
            if how == "eof":
                raise EarlyEOF(f"pushed {got} of {n} bytes ({pace})")
            if await conn.read_end() != "eof":
                raise ConnectionResetError(f"reset after all {n} bytes, where EOF was due")
            if not half_close:
                conn.raw_shut()
            rec.outcome = OK

        return body

    async def _stalled_reader(
        self, conn: Conn, *, base: int, read_bytes: int, tick: float, half_close: bool, pace: str
    ) -> None:
        rec = conn.rec
        rec.want_end, rec.want_outcome = "idle_timeout", EXPECTED_RESET
        await conn.raw_send(f"push {STALL_PUSH_BYTES} {base}\n".encode())
        if half_close:
            conn.raw_shut()
            rec.half_closed = True
        lead = max(read_bytes, int(read_bytes / tick * self.rng.uniform(0.5, 1.5)))
        got, how = await conn.read_pattern(base, lead, read_bytes, tick)
        rec.expected = rec.verified
        if how == "reset":
            raise ConnectionResetError(f"reset after {got} bytes, before the stall ({pace})")
        if how == "eof":
            raise EarlyEOF(f"EOF after {got} bytes, before the stall ({pace})")
        # Stop reading until the proxy is done with us (if it never is: the budget ends it).
        rec.problem = "stalled_reader_not_closed"
        await self._until_logged(conn, open_at=time.monotonic())
        rec.problem = ""
        more, how = await conn.read_pattern(base + got, None)
        rec.expected = rec.verified  # what came before the close, every byte checked
        rec.detail = f"{pace}; stalled after {got} B, then read {more} B and {how}"
        if how == "reset":
            rec.outcome = EXPECTED_RESET
            return
        rec.problem = "idle_close_by_eof"
        raise EarlyEOF(f"a clean EOF after {got + more} bytes of a longer stream (a cut)")

    def early(self) -> Body:
        """An upload the backend answers early: it reads part of it, replies and closes with
        unread bytes (the kernel resets), while the client keeps uploading. The client must
        get the whole reply, then the reset: not a byte less, and not a clean EOF."""
        p = self.params

        async def body(conn: Conn) -> None:
            rng = self.rng
            rec = conn.rec
            rec.want_end, rec.want_outcome = "backend_reset", EXPECTED_RESET
            await conn.open_raw()
            await conn.raw_greeting()
            base = start_offset(rec.id)
            k = rng.randint(1, p.early_read_max)
            m = rng.randint(1, p.early_reply_max)
            rec.expected = m
            rec.detail = f"reply {m} B after {k} B of the upload"
            await conn.raw_send(f"early {k} {m} {base}\n".encode())
            sender = asyncio.get_running_loop().create_task(self._upload_until_reset(conn, base))
            try:
                got, how = await conn.read_pattern(base, m)
                if how == "limit":
                    how = await conn.read_end()
                if how == "eof":
                    # A read returns EOF, not the reset, when a write met the reset first and
                    # took its error: then the upload saw ECONNRESET. EPIPE there instead
                    # means the reset came after a FIN (in CLOSE_WAIT): a clean EOF first.
                    how = "reset" if await sender == "reset" else "eof"
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            rec.detail += f"; got {got} B, then {how}"
            if got == m and how == "reset":
                rec.outcome = EXPECTED_RESET
                return
            if got < m:
                rec.problem = f"reply_cut_by_{how}"
            else:
                rec.problem = "reset_passed_as_eof"
            if how == "reset":
                raise ConnectionResetError(rec.detail)
            raise EarlyEOF(rec.detail)

        return body

    async def _upload_until_reset(self, conn: Conn, base: int) -> str:
        """Upload until the connection breaks: reset (ECONNRESET), epipe, or cap."""
        sent = 0
        try:
            while sent < EARLY_UPLOAD_MAX_BYTES:  # ends with the reset, or by the budget
                await conn.raw_send(pattern(base + sent, READ_BYTES))
                sent += READ_BYTES
        except ConnectionResetError:
            return "reset"
        except BrokenPipeError:
            return "epipe"
        return "cap"

    def hcreset(self) -> Body:
        """Resets after half-closes. `client_now`: the client sends a request and FIN, then
        resets (to a backend that stays silent): the proxy must notice the reset of a side it
        no longer reads, and reset the backend, logging client_reset. `client_ack`: the same
        once the backend confirmed our FIN. `backend`: the backend sends an answer and FIN,
        then resets: the client must get the answer, then the reset (not be left half-open)."""
        p = self.params

        async def body(conn: Conn) -> None:
            rng = self.rng
            rec = conn.rec
            await conn.open_raw()
            await conn.raw_greeting()
            base = start_offset(rec.id)
            n = rng.randint(1, p.hcreset_bytes_max)
            if rec.variant == "backend":
                await self._backend_half_reset(conn, base, n)
                return
            rec.want_end, rec.want_outcome = "client_reset", CLIENT_RESET
            ack = rec.variant == "client_ack"
            await conn.raw_send(b"holdack\n" if ack else b"hold\n")
            await conn.raw_send(pattern(base, n))
            conn.raw_shut()
            rec.half_closed = True
            if ack:
                line = await conn.raw_line()
                if line != b"eof\n":
                    raise EarlyEOF(f"no ack of our FIN (got {line[:60]!r})")
            else:
                await conn.sent_all()  # the reset must not discard our bytes in our kernel
            rec.detail = f"{n} B, FIN, then reset"
            conn.raw_reset()
            rec.outcome = CLIENT_RESET

        return body

    async def _backend_half_reset(self, conn: Conn, base: int, n: int) -> None:
        rec = conn.rec
        rec.want_end, rec.want_outcome = "backend_reset", EXPECTED_RESET
        delay_ms = self.rng.choice((0, 0, 5, 20, 50))
        rec.expected = n
        await conn.raw_send(f"halfreset {n} {base} {delay_ms}\n".encode())
        got, how = await conn.read_pattern(base, n)
        if how == "limit":
            how = await conn.read_end()
        rec.detail = f"answer {n} B, FIN, reset {delay_ms} ms later; got {got} B, then {how}"
        if got < n:
            rec.problem = f"reply_cut_by_{how}"
            if how == "reset":
                raise ConnectionResetError(rec.detail)
            raise EarlyEOF(rec.detail)
        if how == "reset":  # passed on with the answer, before our read of the FIN
            rec.outcome = EXPECTED_RESET
            return
        # The FIN came through: the reset must follow, not a half-open connection the proxy
        # forgets about (or keeps until its idle timeout).
        rec.problem = "reset_not_passed_on"
        for _ in range(1_000_000):  # ends with the reset, the proxy's log line, or the budget
            if conn.tcp_state() == TCP_CLOSE:
                break
            if self.logged(rec.listener, rec.client or "", rec.t_start, None) is not None:
                # The proxy closed its side before logging: the reset, if any, is here.
                for _ in range(10):
                    if conn.tcp_state() == TCP_CLOSE:
                        break
                    await asyncio.sleep(LOG_POLL_S)
                break
            await asyncio.sleep(LOG_POLL_S)
        if conn.tcp_state() != TCP_CLOSE:
            raise EarlyEOF(rec.detail + "; the proxy closed without passing the reset on")
        rec.problem = ""
        rec.detail += ", then the reset"
        rec.outcome = EXPECTED_RESET
