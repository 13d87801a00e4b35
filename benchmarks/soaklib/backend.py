"""A soak backend process: `python -m soaklib.backend --listen HOST:PORT --name b1 --gen 3`.

Each connection is greeted with `hello from NAME GEN` (GEN: which start of this backend, so
the soak knows which process a connection was pinned to when it kills one), then the client's
first line picks a mode:

- `echo`: send back every byte; after the client's FIN, finish echoing and FIN.
- `sink`: read until the client's FIN, answer `COUNT SHA256`, FIN.
- `push N OFFSET`: send N pattern bytes from pattern position OFFSET (honouring flow
  control), then FIN; close once the client's FIN has come too.

Hostile modes, for the soak's resets and half-closes:

- `early K M OFFSET`: read K bytes of the upload, stop reading, answer M pattern bytes from
  OFFSET and close while unread upload bytes wait in the socket, so the kernel sends RST (an
  HTTP server refusing an upload does this). The close waits until the answer is
  acknowledged, so that the kernel never discards it: what the client misses, the proxy lost.
- `hold`: read and discard; ignore the client's FIN (stay open, silent) until the proxy
  closes the connection. `holdack`: the same, but answer the FIN with `eof\n`.
- `halfreset M OFFSET DELAY_MS`: send M pattern bytes and FIN; once both are acknowledged,
  and DELAY_MS later, reset (SO_LINGER 0).

SIGTERM: stop listening, close every connection (FIN after what is buffered), exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import signal
import socket
import struct
import sys
import termios
from collections.abc import Callable, Coroutine
from typing import cast

from soaklib.pattern import MAX_SLICE, pattern

COMMAND_MAX_BYTES = 256
PUSH_CHUNK_BYTES = 64 * 1024
STOP_GRACE_S = 1.0
# Hostile modes: how long to wait for the kernel (unread bytes to arrive, an answer to be
# acknowledged) before closing anyway, and how often to look.
KERNEL_WAIT_S = 5.0
KERNEL_POLL_S = 0.001
_LINGER_RESET = struct.pack("ii", 1, 0)


def _queued(transport: asyncio.BaseTransport, request: int) -> int:
    """FIONREAD (unread bytes) or TIOCOUTQ (bytes not yet acknowledged) of a transport's
    socket; 0 when it is gone."""
    sock = transport.get_extra_info("socket")
    try:
        value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    except (OSError, AttributeError, ValueError):
        return 0
    return value


class BackendConn(asyncio.Protocol):
    def __init__(self, server: BackendServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.mode: str | None = None
        self.buffer = b""
        self.count = 0
        self.digest = hashlib.sha256()
        self.to_push = 0
        self.pushed = 0
        self.push_offset = 0
        self.paused = False
        self.client_eof = False
        self.early_after = 0  # early: answer after this many upload bytes
        self.early_done = False
        self.delay_s = 0.0  # halfreset: between the acknowledged FIN and the reset
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.conns.add(self)
        self.transport.write(f"hello from {self.server.name} {self.server.gen}\n".encode())

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.mode is None:
            self.buffer += data
            if b"\n" not in self.buffer:
                if len(self.buffer) > COMMAND_MAX_BYTES:
                    transport.close()
                return
            line, _, data = self.buffer.partition(b"\n")
            self.buffer = b""
            if not self._start(line.decode(errors="replace").split()):
                transport.close()
                return
            if not data:
                return
        if self.mode == "echo":
            transport.write(data)
        elif self.mode == "early":
            if self.early_done:
                return
            self.count += len(data)
            if self.count >= self.early_after:
                self.early_done = True
                transport.pause_reading()  # from now on the upload waits, unread, in the kernel
                self._spawn(self._early_reply())
        else:  # sink counts; push and hold ignore what the client sends meanwhile
            self.count += len(data)
            if self.mode == "sink":
                self.digest.update(data)

    def _start(self, words: list[str]) -> bool:
        if words in (["echo"], ["sink"]):
            self.mode = words[0]
            return True
        if len(words) == 3 and words[0] == "push":
            self.mode = "push"
            self.to_push, self.push_offset = int(words[1]), int(words[2])
            self._push()
            return True
        if words in (["hold"], ["holdack"]):
            self.mode = words[0]
            return True
        if len(words) == 4 and words[0] == "early" and int(words[1]) > 0:
            self.mode = "early"
            self.early_after = int(words[1])
            self.to_push, self.push_offset = int(words[2]), int(words[3])
            return True
        if len(words) == 4 and words[0] == "halfreset":
            self.mode = "halfreset"
            self.to_push, self.push_offset = int(words[1]), int(words[2])
            self.delay_s = int(words[3]) / 1000
            assert self.transport is not None
            self.transport.write(pattern(self.push_offset, self.to_push))
            self.transport.write_eof()
            self._spawn(self._half_reset())
            return True
        return False

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _kernel_wait(self, done: Callable[[], bool]) -> None:
        """Poll a socket's state (the kernel sends no event for it), for KERNEL_WAIT_S at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KERNEL_WAIT_S
        for _ in range(int(KERNEL_WAIT_S / KERNEL_POLL_S)):
            if done() or loop.time() >= deadline:
                return
            await asyncio.sleep(KERNEL_POLL_S)

    async def _early_reply(self) -> None:
        t = self.transport
        assert t is not None
        # RST needs unread bytes at the close: the client keeps uploading, they come.
        await self._kernel_wait(lambda: t.is_closing() or _queued(t, termios.FIONREAD) > 0)
        if t.is_closing():
            return
        t.write(pattern(self.push_offset, self.to_push))
        await self._kernel_wait(
            lambda: (
                t.is_closing()
                or (not t.get_write_buffer_size() and not _queued(t, termios.TIOCOUTQ))
            )
        )
        t.abort()  # a close with unread bytes: the kernel resets the connection

    async def _half_reset(self) -> None:
        t = self.transport
        assert t is not None
        await self._kernel_wait(
            lambda: (
                t.is_closing()
                or (not t.get_write_buffer_size() and not _queued(t, termios.TIOCOUTQ))
            )
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if t.is_closing():
            return
        sock = t.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        t.abort()

    def _push(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.pushed < self.to_push and not self.paused and not transport.is_closing():
            n = min(PUSH_CHUNK_BYTES, MAX_SLICE, self.to_push - self.pushed)
            transport.write(pattern(self.push_offset + self.pushed, n))
            self.pushed += n
        if self.pushed >= self.to_push and self.to_push >= 0 and not transport.is_closing():
            self.to_push = -1  # done: FIN once
            transport.write_eof()
            if self.client_eof:
                transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        if self.mode == "echo" and self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is None:
            return
        if self.mode == "echo":
            self.transport.resume_reading()
        elif self.mode == "push" and self.to_push >= 0:
            self._push()

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.client_eof = True
        if self.mode in ("hold", "holdack"):
            if self.mode == "holdack":
                self.transport.write(b"eof\n")
            return True  # stay open: only the proxy ends this one
        if self.mode == "sink":
            self.transport.write(f"{self.count} {self.digest.hexdigest()}\n".encode())
        # Still pushing: close when done. Otherwise False closes our side once the write
        # buffer is flushed.
        return self.mode == "push" and self.to_push >= 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if not self.server.conns:
            self.server.idle.set()


class BackendServer:
    def __init__(self, name: str, gen: int) -> None:
        self.name = name
        self.gen = gen
        self.conns: set[BackendConn] = set()
        self.idle = asyncio.Event()  # set whenever the last connection is gone

    async def run(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: BackendConn(self), host, port, reuse_address=True, backlog=1024
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"backend {self.name} gen {self.gen} listening on {host}:{port}", flush=True)
        await stop.wait()
        server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        # A peer that stopped reading would keep a graceful close open: cut it short.
        if self.conns:
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), STOP_GRACE_S)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--name", required=True)
    p.add_argument("--gen", type=int, default=0)
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = BackendServer(args.name, args.gen)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(server.run(host, int(port)))
    result: int = uvloop.run(server.run(host, int(port)))
    return result


if __name__ == "__main__":
    sys.exit(main())
