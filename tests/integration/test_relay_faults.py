"""Relay conformance under faults: resets around half-closes, a peer's last bytes before its
reset, slow readers and the idle timeout, no pipe to be had, a handler that raises, two event
loops in one process.

Each case was a defect of the relay engines (found by review); every engine (copy, splice) on
every event loop (uvloop, plain asyncio) runs them all. The backend is played by the test over
a plain socket (RawBackend) where the order of its reads, writes and resets is the point.
Faults are injected at the syscall edge or at the listener's interface, never by replacing
the engine's data path: the bytes still cross real loopback sockets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvloop

from tcpproxy import splice
from tcpproxy.listener import Listener
from tcpproxy.proxy import Proxy
from tcpproxy.relay import Connection
from tests.harness import (
    Backends,
    Client,
    LoopThread,
    RawBackend,
    RunningProxy,
    ScriptedBackend,
    config_yaml,
    free_port,
    hung_up,
    listener_yaml,
    pattern,
    pattern_digest,
    read_to_end,
    reset,
    send_pattern,
    wait_until,
)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_thread(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    thread = LoopThread(use_uvloop=request.param == "uvloop")
    yield thread
    thread.stop()


@pytest.fixture(params=["copy", "splice"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.close()


Start = Callable[[str], RunningProxy]


def _proxy(start_proxy: Start, address: str, engine: str, **options: object) -> RunningProxy:
    """A proxy with one listener, `relay`, to one backend, `s`."""
    port = free_port()
    return start_proxy(
        config_yaml(listener_yaml("relay", port, {"s": (address, 1)}, engine=engine, **options))
    )


def _open(running: RunningProxy) -> int:
    return running.state(lambda p: p.open_connections)


def _closed_as(running: RunningProxy, reason: str) -> float:
    value = running.metric(
        "tcpproxy_connections_closed_total", listener="relay", backend="s", reason=reason
    )
    return value or 0


def _buffered(proxy: Proxy) -> int:
    """Bytes the proxy has received and not passed on (held, or left in its sockets)."""
    return sum(
        conn.undelivered_bytes()
        for listener in proxy.all_listeners()
        for conn in listener.live_connections()
    )


# -- the idle timeout and a slow reader --

SLOW_READ_BYTES = 4 * 1024
SLOW_READ_PAUSE_S = 0.04  # so at most 100 KiB/s: far slower than the proxy can push
STREAM_BYTES = 1 << 30  # more than any test reads: the stream outlives the test


@pytest.mark.slow
def test_a_slow_reader_that_keeps_reading_is_never_idle(
    backends: Backends, start_proxy: Start, engine: str
) -> None:
    """Regression: activity was measured in bytes read, and a slow reader only lets the proxy
    write; it was closed as idle mid-stream (and, with a FIN, the cut looked like the end).

    The client reads 4 KiB at a time, never faster than 100 KiB/s, for 512 KiB: at least 5
    idle timeouts. The proxy reads a chunk from the backend only after the client took one
    (256 KiB, or a 1 MiB pipe), so whole idle timeouts pass with no read, only writes."""
    log: list[tuple[str, int]] = []
    address = backends.start("s", lambda: ScriptedBackend(log))
    running = _proxy(start_proxy, address, engine, idle_timeout="1s")
    client = Client(running.port("relay"))
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        client.sock.sendall(b"stream %d\n" % STREAM_BYTES)
        want = 512 * 1024
        got = bytearray()
        while len(got) < want:
            chunk = client.sock.recv(SLOW_READ_BYTES)
            assert chunk, f"closed after {len(got)} of {want} bytes"
            got += chunk
            threading.Event().wait(SLOW_READ_PAUSE_S)
        assert bytes(got) == pattern(len(got))
        # Bytes moved all along: the proxy must not have closed it (the kernel still holds
        # what it had queued for us, so only the proxy's own count tells).
        assert _closed_as(running, "idle_timeout") == 0
        assert _open(running) == 1
    finally:
        client.close()


def test_closing_an_idle_connection_that_holds_bytes_is_a_reset(
    backends: Backends, start_proxy: Start, engine: str
) -> None:
    """Regression: the proxy closed with a FIN while it still held bytes for the client, so
    the client read a truncated stream that ended like a complete one. A client that stops
    reading is idle (nothing moves); closing it drops bytes, so it must be a reset."""
    log: list[tuple[str, int]] = []
    address = backends.start("s", lambda: ScriptedBackend(log))
    running = _proxy(start_proxy, address, engine, idle_timeout="1s")
    client = Client(running.port("relay"))
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        client.sock.sendall(b"stream %d\n" % STREAM_BYTES)
        wait_until(lambda: _open(running) == 0, what="the idle connection to be closed")
        assert _closed_as(running, "idle_timeout") == 1
        data, end = read_to_end(client.sock)
        assert data == pattern(len(data))  # what did arrive is intact
        assert end == "reset", f"a cut stream ended with a FIN after {len(data)} bytes"
    finally:
        client.close()


def test_shutting_down_resets_what_it_cuts_and_closes_the_rest(
    backends: Backends, start_proxy: Start, engine: str
) -> None:
    """The same rule at shutdown: a connection that holds bytes for its client is reset, one
    that holds none gets a FIN."""
    log: list[tuple[str, int]] = []
    address = backends.start("s", lambda: ScriptedBackend(log))
    running = _proxy(start_proxy, address, engine)
    quiet = Client(running.port("relay"))
    busy = Client(running.port("relay"))
    try:
        quiet.sock.sendall(b"stream 0\n")  # open and silent
        busy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        busy.sock.sendall(b"stream %d\n" % STREAM_BYTES)  # and never read
        commands = len(b"stream 0\n") + len(b"stream %d\n" % STREAM_BYTES)
        wait_until(
            lambda: running.backend_stat("relay", "s", "bytes_up") == commands,
            what="both connections up",
        )
        wait_until(lambda: running.state(_buffered) > 0, what="the proxy to hold bytes")
        running.shutdown(0)
        assert read_to_end(quiet.sock) == (b"", "eof")
        data, end = read_to_end(busy.sock)
        assert data == pattern(len(data))
        assert end == "reset", f"a cut stream ended with a FIN after {len(data)} bytes"
    finally:
        quiet.close()
        busy.close()


# -- a peer's reset: its last bytes first, and after a half-close too --


def _reply_and_reset(sock: socket.socket, reply: bytes) -> None:
    sock.sendall(reply)
    # Unread bytes in the receive queue: close() sends an RST (and SO_LINGER 0 makes sure).
    reset(sock)


def test_a_backend_reply_before_its_reset_reaches_the_client(
    loop_thread: LoopThread, raw_backend: RawBackend, start_proxy: Start, engine: str
) -> None:
    """Regression: a backend that refuses an upload (reads some, answers, closes with bytes
    unread, so resets) while the client keeps sending. Linux hands the proxy the answer
    before the reset, but the proxy tried its pending write first, met the reset and dropped
    the answer. Without a proxy the client always gets it; through one, it must too."""
    running = _proxy(start_proxy, raw_backend.address, engine)
    reply = b"413 Payload Too Large\n"
    client = Client(running.port("relay"))
    stop = threading.Event()

    def upload() -> None:
        offset = 0
        try:
            while not stop.is_set():
                client.sock.sendall(pattern(64 * 1024, offset))
                offset += 64 * 1024
        except OSError:
            pass  # reset: the end we expect

    backend = raw_backend.accept()
    pool = ThreadPoolExecutor(1)
    try:
        uploading = pool.submit(upload)
        need = 64 * 1024
        while need:
            need -= len(backend.recv(need))
        # The backend reads no more: once the proxy holds client bytes it cannot write, the
        # backend's receive queue is full.
        wait_until(lambda: running.state(_buffered) > 0, what="the upload to back up")
        # On the proxy's loop thread, so the proxy sees the answer and the reset in one
        # event, as it does whenever it is a little busy.
        loop_thread.call(_reply_and_reset, backend, reply)
        data, end = read_to_end(client.sock)
        assert data == reply, f"the client got {data!r}, then {end}"
        stop.set()
        uploading.result(timeout=10)
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)  # wakes the uploader
        pool.shutdown()
        client.close()
        backend.close()
    wait_until(lambda: _open(running) == 0, what="connection closed")


def test_a_client_s_last_bytes_before_its_reset_reach_the_backend(
    loop_thread: LoopThread, raw_backend: RawBackend, start_proxy: Start, engine: str
) -> None:
    """The same the other way: the client, while the backend floods it and it reads nothing,
    sends its last words and resets. They must reach the backend before the reset does."""
    running = _proxy(start_proxy, raw_backend.address, engine)
    client = Client(running.port("relay"))
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    backend = raw_backend.accept()
    stop = threading.Event()

    def flood() -> None:
        offset = 0
        try:
            while not stop.is_set():
                backend.sendall(pattern(64 * 1024, offset))
                offset += 64 * 1024
        except OSError:
            pass  # reset: the end we expect

    pool = ThreadPoolExecutor(1)
    try:
        flooding = pool.submit(flood)
        wait_until(lambda: running.state(_buffered) > 0, what="the flood to back up")
        loop_thread.call(_reply_and_reset, client.sock, b"last words\n")
        data, end = read_to_end(backend)
        assert data == b"last words\n", f"the backend got {data!r}, then {end}"
        stop.set()
        flooding.result(timeout=10)
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            backend.shutdown(socket.SHUT_RDWR)  # wakes the flood
        pool.shutdown()
        client.close()
        backend.close()
    wait_until(lambda: _open(running) == 0, what="connection closed")


def test_a_client_reset_after_its_half_close_reaches_the_backend(
    raw_backend: RawBackend, start_proxy: Start, engine: str
) -> None:
    """Regression: once the client's FIN was passed on, the proxy ignored further events on
    the client's socket (edge-triggered: they never came again); its reset was lost and the
    connection stayed open for good (no idle timeout)."""
    running = _proxy(start_proxy, raw_backend.address, engine, idle_timeout=0)
    client = Client(running.port("relay"))
    backend = raw_backend.accept()
    try:
        client.sock.sendall(b"hello")
        assert backend.recv(16) == b"hello"
        client.sock.shutdown(socket.SHUT_WR)
        assert backend.recv(16) == b""  # the half-close, passed on
        reset(client.sock)
        assert hung_up(backend), "the backend never heard of the client's reset"
        wait_until(lambda: _open(running) == 0, what="the proxy to forget the connection")
    finally:
        client.close()
        backend.close()


def test_a_backend_reset_after_its_half_close_reaches_the_client(
    raw_backend: RawBackend, start_proxy: Start, engine: str
) -> None:
    running = _proxy(start_proxy, raw_backend.address, engine, idle_timeout=0)
    client = Client(running.port("relay"))
    backend = raw_backend.accept()
    try:
        backend.sendall(b"bye")
        backend.shutdown(socket.SHUT_WR)
        assert client.read_exactly(3) == b"bye"
        assert client.sock.recv(16) == b""  # the half-close, passed on
        reset(backend)
        assert hung_up(client.sock), "the client never heard of the backend's reset"
        wait_until(lambda: _open(running) == 0, what="the proxy to forget the connection")
    finally:
        client.close()
        backend.close()


# -- the proxy's own failures: no pipe, a bug in a handler --


def test_no_pipe_to_be_had_never_stalls_a_connection(
    backends: Backends, start_proxy: Start, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the splice engine took a pipe outside its error handling; out of
    descriptors (EMFILE from pipe2), the exception went up to the poller, which only logged
    it: the event was used up and the connection stalled for good. Now a connection with no
    pipe must carry on (or be reset), never hang. The copy engine makes no pipes."""
    address = backends.start("s")
    running = _proxy(start_proxy, address, engine)
    calls: list[int] = []
    real_pipe2 = os.pipe2

    def no_pipes(flags: int) -> tuple[int, int]:
        if exhausted.is_set():
            calls.append(flags)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_pipe2(flags)

    exhausted = threading.Event()
    exhausted.set()
    monkeypatch.setattr(os, "pipe2", no_pipes)
    # No idle pipes left from earlier connections: each direction must make one.
    monkeypatch.setattr(splice, "POOL", splice.PipePool())
    client = Client(running.port("relay"))
    try:
        client.sock.sendall(b"a request\n")
        try:
            answer = client.read_exactly(len(b"hello from s\na request\n"))
        except ConnectionResetError:
            answer = b"(reset)"  # acceptable: that one connection ended, visibly
        except TimeoutError:
            pytest.fail("with no pipe to be had, the connection hung")
        assert answer in (b"hello from s\na request\n", b"(reset)")
        if engine == "splice":
            assert calls, "the fault was never hit: no pipe was asked for"
    finally:
        client.close()
    exhausted.clear()
    # And with pipes back, the proxy serves as before.
    again = Client(running.port("relay"))
    try:
        assert again.greeting() == "s"
        assert again.echo(b"ping\n") == b"ping\n"
    finally:
        again.close()


def test_an_exception_in_a_handler_resets_that_connection_only(
    backends: Backends, start_proxy: Start, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an exception in an event handler was logged and forgotten; with edge
    triggering, that connection's events had been used up and it hung. Now it is reset, and
    every other connection goes on. The fault is injected where the engine calls back into
    the listener once the backend connection is up, for one client only."""
    address = backends.start("s")
    running = _proxy(start_proxy, address, engine, connect_timeout="60s")
    port = running.port("relay")
    before = Client(port)
    assert before.greeting() == "s"
    victim_address: list[object] = []
    real = Listener.connection_established

    def faulty(self: Listener, conn: Connection) -> None:
        if conn.peername in victim_address:
            raise RuntimeError("injected fault")
        real(self, conn)

    monkeypatch.setattr(Listener, "connection_established", faulty)
    victim = socket.socket()
    victim.settimeout(10)
    victim.bind(("127.0.0.1", 0))
    victim_address.append(victim.getsockname())
    try:
        try:
            victim.connect(("127.0.0.1", port))
            data, end = read_to_end(victim)
        except ConnectionResetError:
            # Reset so soon that connect() (a poll, then SO_ERROR) saw it.
            data, end = b"", "reset"
        except TimeoutError:
            pytest.fail("the connection whose handler raised hung")
        assert end == "reset", f"got {data!r}, then a FIN"
        assert b"hello from s\n".startswith(data)
        wait_until(lambda: _open(running) == 1, what="the proxy to forget that connection")
        # The others: one from before, one after.
        assert before.echo(b"still here\n") == b"still here\n"
        after = Client(port)
        try:
            assert after.greeting() == "s"
            assert after.echo(b"new one\n") == b"new one\n"
        finally:
            after.close()
    finally:
        victim.close()
        before.close()


# -- two event loops in one process --


def test_two_proxies_on_two_loop_threads_keep_their_bytes_apart(
    loop_thread: LoopThread, backends: Backends, start_proxy: Start, engine: str, tmp_path: Path
) -> None:
    """Regression: one read buffer served every event loop of the process, and recv_into and
    send release the GIL: two proxies on two threads wrote into each other's streams."""
    size = 32 * 1024 * 1024
    first = _proxy(start_proxy, backends.start("one", lambda: ScriptedBackend([])), engine)
    # A second proxy, on a second loop thread of the same kind, with its own backend.
    other_thread = LoopThread(use_uvloop=isinstance(loop_thread.loop, uvloop.Loop))
    other_backends = Backends(other_thread)
    second: RunningProxy | None = None
    try:
        address = other_backends.start("two", lambda: ScriptedBackend([]))
        path = tmp_path / "second.yaml"
        path.write_text(
            config_yaml(listener_yaml("relay", free_port(), {"s": (address, 1)}, engine=engine))
        )
        second = RunningProxy(other_thread, path)
        expected = pattern_digest(size)

        def download(running: RunningProxy) -> str:
            """'intact', or where the bytes differ from what the backend sent."""
            client = Client(running.port("relay"), timeout=60)
            try:
                client.sock.sendall(b"push %d\n" % size)
                got, end = read_to_end(client.sock)
            finally:
                client.close()
            block = 64 * 1024
            bad = [
                offset
                for offset in range(0, len(got), block)
                if got[offset : offset + block] != pattern(min(block, len(got) - offset), offset)
            ]
            if len(got) == size and end == "eof" and not bad:
                return "intact"
            first = bad[0] if bad else None
            return (
                f"{len(got)} bytes then {end}; {len(bad)} of {-(-len(got) // block)} 64 KiB "
                f"blocks differ, the first at {first}"
            )

        def upload(running: RunningProxy) -> str:
            client = Client(running.port("relay"), timeout=60)
            try:
                client.sock.sendall(b"sink\n")
                send_pattern(client.sock, size)
                client.sock.shutdown(socket.SHUT_WR)
                return client.read_line()
            finally:
                client.close()

        # Both proxies, both ways, all at once; every byte is checked.
        with ThreadPoolExecutor(4) as pool:
            downs = [pool.submit(download, running) for running in (first, second)]
            ups = [pool.submit(upload, running) for running in (first, second)]
            results = [f.result(timeout=120) for f in downs] + [
                "intact" if line == f"{size} {expected}\n" else f"the backend got {line!r}"
                for line in (f.result(timeout=120) for f in ups)
            ]
        assert results == ["intact"] * 4
    finally:
        if second is not None:
            second.shutdown(0)
        other_backends.close()
        other_thread.stop()
