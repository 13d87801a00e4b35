"""The splice engine: bytes move socket -> pipe -> socket inside the kernel (os.splice),
never copied into Python. Everything but the data path is the copy engine's (relay.py).

Each direction borrows a pipe from a small pool only while it has bytes in flight; a pipe
that a slow peer leaves full is held (that is the flow control: the fast side is not read
until the pipe drains). When no pipe can be had (out of descriptors), the bytes go through
user space as in the copy engine until one can.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from tcpproxy.relay import PUMP_ROUNDS, Connection, Direction

PIPE_SIZE_BYTES = 1 << 20
SPLICE_CHUNK_BYTES = 1 << 20
PIPE_POOL_MAX = 64
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

log = logging.getLogger("tcpproxy")


class PipePool:
    """Idle pipes for reuse: making a pipe costs two syscalls and two descriptors."""

    def __init__(self, limit: int = PIPE_POOL_MAX) -> None:
        self._idle: list[tuple[int, int]] = []
        self._limit = limit

    def take(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE_BYTES)
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an empty pipe."""
        if len(self._idle) < self._limit:
            self._idle.append(pipe)
        else:
            close_pipe(pipe)


def close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


POOL = PipePool()


class SpliceConnection(Connection):
    """A connection whose bytes never enter user space once the backend is up."""

    __slots__ = ()

    def _pump(self, d: Direction) -> None:
        """src has bytes: move them through the pipe until src is empty or dst full."""
        assert d.dst is not None
        if d.pipe is None:
            try:
                d.pipe = POOL.take()
            except OSError as exc:
                # Out of descriptors (or pipe memory): copy this round instead of stalling.
                log.debug("splice: no pipe (%s): copying", exc)
                Connection._pump(self, d)
                return
        src = d.src.fileno()
        dst = d.dst.fileno()
        reading = True
        try:
            # Several rounds per wake-up: a socket often has more than one pipe's worth.
            for _ in range(PUMP_ROUNDS):
                reading = True
                n = os.splice(src, d.pipe[1], SPLICE_CHUNK_BYTES, flags=_FLAGS)
                if n == 0:
                    d.ready = False
                    d.eof = True
                    break
                if d.upstream:
                    self.bytes_up += n
                else:
                    self.bytes_down += n
                d.in_pipe = n
                reading = False
                while d.in_pipe:
                    d.in_pipe -= os.splice(d.pipe[0], dst, d.in_pipe, flags=_FLAGS)
            else:
                self.loop.call_soon(self._resume, d)  # still more: others first
        except BlockingIOError:
            if reading:
                d.ready = False  # src is empty (else dst is full: its writable event resumes)
        except OSError as exc:
            self._lost(exc, client=d.upstream == reading)
            return
        self._settle(d)

    def _settle(self, d: Direction) -> None:
        if d.in_pipe or d.pipe is None:
            return
        POOL.give(d.pipe)
        d.pipe = None
        if d.eof:
            self._pass_fin(d)

    def _flush(self, d: Direction) -> None:
        if d.rest or d.pipe is None:
            super()._flush(d)  # early client bytes, written before any splicing
            return
        assert d.dst is not None
        try:
            while d.in_pipe:
                d.in_pipe -= os.splice(d.pipe[0], d.dst.fileno(), d.in_pipe, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(exc, client=not d.upstream)
            return
        self._settle(d)
        if d.ready and not d.eof:
            self._pump(d)

    def buffered_bytes(self) -> int:
        """Early client bytes, and what sits in the pipes (kernel memory, bounded by the
        pipe size)."""
        in_pipes = self.up.in_pipe + (self.down.in_pipe if self.down is not None else 0)
        return super().buffered_bytes() + in_pipes

    def _take_pipe(self, d: Direction) -> bytes:
        """What sits in d's pipe, read out (after a peer's reset: rare, so a copy is fine)."""
        if d.pipe is None:
            return b""
        parts = []
        with contextlib.suppress(OSError):
            while d.in_pipe:
                chunk = os.read(d.pipe[0], d.in_pipe)
                if not chunk:
                    break
                parts.append(chunk)
                d.in_pipe -= len(chunk)
        self._drop_pipe(d)
        return b"".join(parts)

    def _drop_pipe(self, d: Direction) -> None:
        if d.pipe is not None:
            close_pipe(d.pipe)
            d.pipe = None
        d.in_pipe = 0

    def _release(self) -> None:
        for d in (self.up, self.down):
            if d is not None and d.pipe is not None:
                close_pipe(d.pipe)  # may hold unsent bytes: never back to the pool
                d.pipe = None
