"""Test harness: a proxy on its own event loop thread, backends beside it, blocking clients.

Tests drive the proxy the way users do, over real loopback sockets, while the proxy runs its
real event loop (uvloop) in a thread; `LoopThread.call` reads its state safely from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from tcpproxy import acceptor
from tcpproxy.affinity import ClientHash, client_key
from tcpproxy.demo import EchoProtocol
from tcpproxy.proxy import Proxy, ReloadResult
from tcpproxy.reloader import Reloader

T = TypeVar("T")
WAIT_S = 10.0
# The relay engine listener_yaml() writes unless told otherwise; the `each_engine` fixture
# (tests/integration/conftest.py) runs a test module once per engine through it.
DEFAULT_ENGINE = ["copy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S, what: str = "") -> None:
    """Poll a condition that has no event to await (state in another process or thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


class WallClock:
    """Stands in for the `time` module in tcpproxy's modules: `time()` runs `offset_s` ahead of
    the real clock, everything else is the real module's. Tests move the proxy's wall clock
    (a rollout's steps) rather than wait for it, and nothing then races the real one."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def time(self) -> float:
        return time.time() + self.offset_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def move_wall_clock(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    """Give every loaded tcpproxy module that reads `time` a WallClock instead (wherever the
    code that reads it lives); `monkeypatch` puts the real module back after the test."""
    clock = WallClock()
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "tcpproxy" and getattr(module, "time", None) is time:
            monkeypatch.setattr(module, "time", clock)
    return clock


async def sleep_until(when: float) -> None:
    """On a loop thread: sleep until the loop's clock reads `when`. The loop runs its timers
    in the order they are due, so every timer due before `when` has run when this returns:
    a way to wait for "after the proxy's deadline", never for a guessed number of seconds."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, when - loop.time()))


class LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self, use_uvloop: bool = True) -> None:
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = WAIT_S) -> T:
        async def wrapper() -> T:
            return await coro

        future: Future[T] = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper())

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)
        self.loop.close()


class Backends:
    """Test backends on a LoopThread: echo servers that greet with their name, and raw ones."""

    def __init__(self, thread: LoopThread) -> None:
        self.thread = thread
        self.servers: dict[str, asyncio.AbstractServer] = {}
        self.addresses: dict[str, str] = {}

    def start(
        self,
        name: str,
        factory: Callable[[], asyncio.Protocol] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> str:
        """Start a backend; `host` may be any address of 127.0.0.0/8 (all are loopback)."""
        port = port or free_port()

        async def start() -> asyncio.AbstractServer:
            loop = asyncio.get_running_loop()
            return await loop.create_server(
                factory or (lambda: EchoProtocol(name)), host, port, reuse_address=True
            )

        self.servers[name] = self.thread.run(start())
        self.addresses[name] = f"{host}:{port}"
        return self.addresses[name]

    def stop(self, name: str) -> None:
        server = self.servers.pop(name)

        async def stop() -> None:
            server.close()

        self.thread.run(stop())

    def close(self) -> None:
        for name in list(self.servers):
            self.stop(name)


class RunningProxy:
    """A Proxy started from a config file in `directory`, on its own loop thread."""

    def __init__(self, thread: LoopThread, config_path: Path, metrics_linger_s: float = 0) -> None:
        self.thread = thread
        self.config_path = config_path
        self.proxy: Proxy = thread.call(Proxy, config_path, metrics_linger_s)
        thread.run(self.proxy.start())
        self.reloader: Reloader | None = None

    def watch(self, poll_interval_s: float = 0) -> None:
        """Start the real reloader (directory watch, SIGHUP handler, optional poll)."""

        def start() -> Reloader:
            reloader = Reloader(self.proxy, poll_interval_s)
            reloader.start()
            return reloader

        self.reloader = self.thread.call(start)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample as a Prometheus scrape would see it (None: no such series)."""
        return self.state(lambda p: p.metrics.registry.get_sample_value(name, labels))

    def reload_count(self, result: str = "success") -> float | None:
        return self.metric("tcpproxy_config_reloads_total", result=result)

    def write_config(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def reload(self, trigger: str = "test") -> ReloadResult:
        return self.thread.run(self.proxy.reload(trigger))

    def port(self, listener: str) -> int:
        return int(
            self.thread.call(lambda: self.proxy.listeners[listener].config.bind).rsplit(":", 1)[1]
        )

    def state(self, fn: Callable[[Proxy], T]) -> T:
        return self.thread.call(fn, self.proxy)

    def backend_stat(self, listener: str, backend: str, attr: str) -> Any:
        def read(proxy: Proxy) -> Any:
            for lst in proxy.all_listeners():
                if lst.name != listener:
                    continue
                for b in lst.all_backends():
                    if b.name == backend:
                        value = getattr(b, attr)
                        return value() if callable(value) else value
            raise KeyError((listener, backend))

        return self.state(read)

    def shutdown(self, grace_s: float = 0) -> None:
        if self.reloader is not None:
            self.thread.run(self.reloader.stop())
        self.thread.run(self.proxy.shutdown(grace_s))


def listener_yaml(
    name: str,
    port: int,
    backends: dict[str, tuple[str, int]],
    **options: object,
) -> str:
    """YAML for one listener; `backends` maps name -> (address, weight)."""
    lines = [
        f"  - name: {name}",
        f'    bind: "127.0.0.1:{port}"',
        "    backends:",
    ]
    for backend, (address, weight) in backends.items():
        lines += [
            f"      - name: {backend}",
            f'        address: "{address}"',
            f"        weight: {weight}",
        ]
    options.setdefault("engine", DEFAULT_ENGINE[0])
    lines += [f"    {key}: {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def config_yaml(*listeners: str) -> str:
    return "listeners:\n" + "".join(listeners)


class Client:
    """A blocking client socket with timeouts, for tests."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = WAIT_S,
        source: str | None = None,
    ) -> None:
        """`source`: the client's own address (any of 127.0.0.0/8 on loopback)."""
        source_address = (source, 0) if source is not None else None
        self.sock = socket.create_connection((host, port), timeout, source_address)

    def greeting(self) -> str:
        """The backend's `hello from NAME` line: which backend this connection reached."""
        line = self.read_line()
        assert line.startswith("hello from "), line
        return line.removeprefix("hello from ").strip()

    def read_line(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                break
            data += chunk
        return data.decode()

    def read_exactly(self, n: int) -> bytes:
        parts = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError(f"connection closed with {n} bytes still expected")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def read_all(self) -> bytes:
        parts = []
        while chunk := self.sock.recv(1 << 20):
            parts.append(chunk)
        return b"".join(parts)

    def is_closed(self, timeout: float = WAIT_S) -> bool:
        """True once the peer closed (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1 << 16) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(WAIT_S)

    def echo(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.read_exactly(len(data))

    def close(self) -> None:
        self.sock.close()


def greetings(port: int, n: int) -> Counter[str]:
    """Open n connections one after another; count which backend greeted each."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        client = Client(port)
        seen[client.greeting()] += 1
        client.close()
    return seen


def greetings_from(port: int, sources: list[str]) -> dict[str, str]:
    """A new connection from each client address in `sources`: the backend that greeted it."""
    seen = {}
    for source in sources:
        client = Client(port, source=source)
        seen[source] = client.greeting()
        client.close()
    return seen


def client_hash_mapping(
    weights: dict[str, int], sources: list[str], rollout: tuple[str, str, int] | None = None
) -> dict[str, str | None]:
    """Where `balance: client_hash` sends each client address, by the pure mapping."""
    h = ClientHash([(name, name, w) for name, w in weights.items()], rollout)
    return {s: h.pick(client_key(s)) for s in sources}


@contextlib.contextmanager
def clients(port: int, n: int) -> Iterator[list[Client]]:
    opened = [Client(port) for _ in range(n)]
    try:
        yield opened
    finally:
        for c in opened:
            c.close()


_PERIOD = 65521  # prime, so the pattern does not line up with power-of-two chunk sizes
_TILE = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(_PERIOD)) * 34  # ~2.2 MB


def pattern(n: int, offset: int = 0) -> bytes:
    """Deterministic bytes whose value depends on position, so loss or reordering shows."""
    parts = []
    while n > 0:
        start = offset % _PERIOD
        take = min(n, len(_TILE) - _PERIOD)
        parts.append(_TILE[start : start + take])
        n -= take
        offset += take
    return b"".join(parts)


PUSH_CHUNK_BYTES = 64 * 1024


class ScriptedBackend(asyncio.Protocol):
    """A backend driven by the client's first line:

    - `push N`: send N pattern bytes (honouring flow control), then FIN; keep reading and
      record what arrives after our FIN in `log` (half-close the other way).
    - `stream N`: the same without the FIN: the connection stays open and silent.
    - `flood TAG`: push pattern bytes without end (honouring flow control) until the client's
      FIN, then FIN after the last of them; log how many were sent as (`flood-sent TAG`, N).
      For streams that must outlive something of unknown length: the client says when.
    - `sink`: read until the client's FIN, then answer `COUNT SHA256` and FIN.
    - `reset`: wait for the next bytes, then reset the connection.
    """

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.mode: str | None = None
        self.count = 0
        self.digest = hashlib.sha256()
        self.to_push = 0
        self.pushed = 0
        self.paused = False
        self.client_eof = False
        self.tag = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.mode is None:
            self.buffer += data
            if b"\n" not in self.buffer:
                return
            line, _, data = self.buffer.partition(b"\n")
            command, *args = line.decode().split()
            self.mode = command
            if command in ("push", "stream"):
                self.to_push = int(args[0])
                self._push()
            elif command == "flood":
                self.tag = args[0]
                self._flood()
            if not data:
                return
        if self.mode == "reset":
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        self.count += len(data)
        self.digest.update(data)

    def _push(self) -> None:
        assert self.transport is not None
        while self.pushed < self.to_push and not self.paused:
            n = min(PUSH_CHUNK_BYTES, self.to_push - self.pushed)
            self.transport.write(pattern(n, self.pushed))
            self.pushed += n
        if self.pushed == self.to_push and not self.paused and self.mode == "push":
            self.transport.write_eof()
            self.to_push = -1
            if self.client_eof:
                self.transport.close()

    def _flood(self) -> None:
        assert self.transport is not None
        while not self.paused and not self.client_eof:
            self.transport.write(pattern(PUSH_CHUNK_BYTES, self.pushed))
            self.pushed += PUSH_CHUNK_BYTES

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode in ("push", "stream") and self.to_push >= 0:
            self._push()
        elif self.mode == "flood":
            self._flood()

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == "sink":
            self.transport.write(f"{self.count} {self.digest.hexdigest()}\n".encode())
        self.log.append((f"{self.mode}-eof", self.count))
        self.client_eof = True
        if self.mode == "flood":
            # Closing flushes what is still buffered, then sends our FIN.
            self.log.append((f"flood-sent {self.tag}", self.pushed))
            return False
        # A push still under way goes on after the client's FIN (half-close); close after it.
        return self.mode == "push" and self.to_push >= 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.append((f"{self.mode}-lost", self.count))


# -- for the relay conformance suite (tests/integration/test_relay*.py) --

_TCP_INFO_STATE = 0  # offsets in struct tcp_info (linux/tcp.h)
_TCP_INFO_RETRANSMITS = 2
TCP_SYN_SENT = 2


def tcp_info(sock: socket.socket) -> tuple[int, int]:
    """(state, retransmits of the segment at the head of the queue) from TCP_INFO."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[_TCP_INFO_STATE], info[_TCP_INFO_RETRANSMITS]


_TCP_INFO_UNACKED = 24  # a listening socket's: clients in its accept queue


def accept_queue_length(sock: socket.socket) -> int:
    """Clients whose handshake the kernel completed and that wait in a listening socket's
    queue for an accept() (TCP_INFO's tcpi_unacked, for a listening socket)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_UNACKED + 4)
    length: int = struct.unpack_from("I", info, _TCP_INFO_UNACKED)[0]
    return length


def proxy_accept_queue(running: RunningProxy, listener: str) -> int:
    """accept_queue_length of a proxy listener's listening socket."""

    def read(proxy: Proxy) -> int:
        server = proxy.listeners[listener].server
        assert isinstance(server, acceptor.Server)
        return accept_queue_length(server.sock)

    return running.state(read)


def reset(sock: socket.socket) -> None:
    """Close abortively: the peer gets an RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def hung_up(sock: socket.socket, timeout: float = WAIT_S) -> bool:
    """True once the connection has ended under `sock` within `timeout`: poll() reports
    POLLHUP or POLLERR. The peer's FIN alone sets neither (while we have not shut down our own
    side), so after the peer's FIN this is how a later reset shows without reading or writing."""
    poll = select.poll()
    poll.register(sock, select.POLLHUP | select.POLLERR)
    return bool(poll.poll(int(timeout * 1000)))


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything `sock` receives, and how it ended: "eof" (a FIN) or "reset". A stream that
    neither ends nor sends raises TimeoutError (the socket's own timeout)."""
    parts = []
    try:
        while chunk := sock.recv(1 << 20):
            parts.append(chunk)
    except ConnectionResetError:
        return b"".join(parts), "reset"
    return b"".join(parts), "eof"


def send_pattern(sock: socket.socket, n: int, chunk: int = 1 << 20) -> None:
    """Send pattern(n) in pieces (no n-byte copy in memory), blocking as flow control says."""
    for offset in range(0, n, chunk):
        sock.sendall(pattern(min(chunk, n - offset), offset))


def pattern_digest(n: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    for offset in range(0, n, chunk):
        digest.update(pattern(min(chunk, n - offset), offset))
    return digest.hexdigest()


def read_digest(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF: (byte count, sha256). A reset raises, as it should in the middle of data."""
    digest = hashlib.sha256()
    count = 0
    while chunk := sock.recv(1 << 20):
        digest.update(chunk)
        count += len(chunk)
    return count, digest.hexdigest()


class RawBackend:
    """A backend the test plays itself, over plain blocking sockets: it reads, writes,
    half-closes or resets exactly when the test says. The proxy connects; `accept` hands the
    test that connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def accept(self, timeout: float = WAIT_S) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(WAIT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def full_accept_queue() -> Iterator[str]:
    """The address of a listening socket whose accept queue is full: Linux drops further SYNs
    (no RST, no SYN-ACK), so a connect to it hangs until the connector gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(address)
            fillers.append(s)
        yield f"127.0.0.1:{address[1]}"
    finally:
        for s in fillers:
            s.close()
        server.close()
