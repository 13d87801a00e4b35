"""Closing connections on time: the sweep over a listener's connections (idle, first byte,
half-close timeouts), and each draining backend's deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from tcpproxy import relay
from tcpproxy.lifecycle import State

if TYPE_CHECKING:
    from tcpproxy.backend import Backend
    from tcpproxy.config import ListenerConfig
    from tcpproxy.relay import Connection

# At a drain deadline the remaining connections are closed over this window, in steps, so
# that their clients do not all reconnect in the same instant.
DRAIN_CLOSE_WINDOW_S = 1.0
DRAIN_CLOSE_STEPS = 10
# The sweep runs four times per its shortest timeout, within these bounds.
SWEEP_MIN_S = 0.05
IDLE_SWEEP_MAX_S = 10.0

# End reasons (the access log's `end`) of the sweep's own timeouts.
FIRST_BYTE_TIMEOUT = "first_byte_timeout"
HALF_CLOSE_TIMEOUT = "half_close_timeout"

_HALF_CLOSED = frozenset({State.CLIENT_HALF_CLOSED, State.BACKEND_HALF_CLOSED})


class Reaper:
    """One sweep per listener rather than a timer per connection, and a timer per draining
    backend."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, live: Callable[[], Iterable[Connection]]
    ) -> None:
        self.loop = loop
        self._live = live  # every connection of the listener, whatever its state
        self._idle_timeout = 0.0
        self._first_byte_timeout = 0.0
        self._half_close_timeout = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_interval: float | None = None
        # Half-closed connections, and the sweep that first saw each one so.
        self._half_closed: dict[Connection, float] = {}

    # -- the sweep: idle, first byte and half-close timeouts --

    def set_timeouts(self, config: ListenerConfig) -> None:
        self._idle_timeout = config.idle_timeout
        self._first_byte_timeout = config.first_byte_timeout
        self._half_close_timeout = config.half_close_timeout
        timeouts = [
            t
            for t in (config.idle_timeout, config.first_byte_timeout, config.half_close_timeout)
            if t > 0
        ]
        interval = min(max(min(timeouts) / 4, SWEEP_MIN_S), IDLE_SWEEP_MAX_S) if timeouts else None
        if self._idle_handle is not None:
            if interval == self._idle_interval:
                return  # a reload that keeps the timeout must not restart (starve) the sweep
            self._idle_handle.cancel()
            self._idle_handle = None
        self._idle_interval = interval
        if interval is not None:
            self._idle_handle = self.loop.call_later(interval, self._sweep_idle, interval)

    def _sweep_idle(self, interval: float) -> None:
        # Next sweep first: a bug met below must not end the sweeps for good.
        self._idle_handle = self.loop.call_later(interval, self._sweep_idle, interval)
        now = self.loop.time()
        idle = self._idle_timeout
        first_byte = self._first_byte_timeout
        half_close = self._half_close_timeout
        seen_half_closed = self._half_closed
        half_closed: dict[Connection, float] = {}
        expired: list[tuple[Connection, str]] = []
        for conn in self._live():
            mark = conn.activity_mark()
            if mark != conn.idle_mark:
                conn.idle_mark = mark
                conn.idle_since = now
            if conn.state in _HALF_CLOSED:
                # Counted from when it was first seen half-closed, or from its last byte if
                # bytes still move (a long answer after the client's FIN is not stalled).
                since = half_closed[conn] = seen_half_closed.get(conn, now)
                if half_close and now - max(since, conn.idle_since) >= half_close:
                    expired.append((conn, HALF_CLOSE_TIMEOUT))
                    continue
            if idle and now - conn.idle_since >= idle:
                expired.append((conn, relay.IDLE_TIMEOUT))
            elif (
                first_byte
                and now - conn.opened_at >= first_byte
                and not (conn.bytes_up or conn.bytes_down or conn.pending_bytes)
                and conn.state is not State.CLOSING
            ):
                # Neither the client nor the backend has said a thing since the accept: a
                # silent client holding a slot (and a backend connection), not a quiet one.
                expired.append((conn, FIRST_BYTE_TIMEOUT))
        self._half_closed = half_closed
        for conn, reason in expired:
            conn.shut(reason)

    def cancel(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
            self._idle_interval = None
        self._half_closed = {}

    # -- drain deadlines, and closing on request --

    def close_soon(self, conns: list[Connection], reason: str) -> None:
        """Close `conns` over the drain-close window, in steps, the first step at once."""
        for delay, batch in _in_steps(conns):
            self.loop.call_later(delay, _close_batch, batch, reason)

    def start_draining(self, backend: Backend, now: float, drain_timeout: float) -> None:
        deadline = now + drain_timeout
        handle = self.loop.call_at(deadline, self._drain_deadline, backend)
        backend.start_draining(deadline, handle)

    def _drain_deadline(self, backend: Backend) -> None:
        backend.drain_handle = None
        # Every connection the backend holds, connecting ones included.
        conns = list(backend.connections)
        deadline = backend.drain_deadline
        for delay, batch in _in_steps(conns):
            self.loop.call_later(delay, self._drain_close, backend, deadline, batch)

    def _drain_close(
        self, backend: Backend, deadline: float | None, conns: list[Connection]
    ) -> None:
        if backend.drain_deadline != deadline:
            return  # put back meanwhile (and maybe removed again: a new deadline)
        for conn in conns:
            # (One still connecting at the deadline may have been retried on another
            # backend since: it is that one's now.)
            if not conn.closed and conn in backend.connections:
                backend.drain_closed += 1
                conn.shut(relay.DRAIN_DEADLINE)


def _in_steps(conns: list[Connection]) -> Iterator[tuple[float, list[Connection]]]:
    """`conns` in DRAIN_CLOSE_STEPS batches, each with its delay within DRAIN_CLOSE_WINDOW_S."""
    if not conns:
        return
    step = -(-len(conns) // DRAIN_CLOSE_STEPS)
    for i in range(0, len(conns), step):
        yield DRAIN_CLOSE_WINDOW_S * (i // step) / DRAIN_CLOSE_STEPS, conns[i : i + step]


def _close_batch(conns: list[Connection], reason: str) -> None:
    for conn in conns:
        conn.shut(reason)  # a no-op for one that closed meanwhile
