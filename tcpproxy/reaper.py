"""Closing connections on time: the idle sweep over a listener's connections, and each
draining backend's deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from tcpproxy import relay

if TYPE_CHECKING:
    from tcpproxy.backend import Backend
    from tcpproxy.relay import Connection

# At a drain deadline the remaining connections are closed over this window, in steps, so
# that their clients do not all reconnect in the same instant.
DRAIN_CLOSE_WINDOW_S = 1.0
DRAIN_CLOSE_STEPS = 10
IDLE_SWEEP_MAX_S = 10.0


class Reaper:
    """One idle sweep per listener rather than a timer per connection, and a timer per
    draining backend."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, live: Callable[[], Iterable[Connection]]
    ) -> None:
        self.loop = loop
        self._live = live  # every connection of the listener, whatever its state
        self._idle_timeout = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_interval: float | None = None

    # -- idle timeout --

    def set_idle_timeout(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout
        interval = min(max(idle_timeout / 4, 0.05), IDLE_SWEEP_MAX_S) if idle_timeout > 0 else None
        if self._idle_handle is not None:
            if interval == self._idle_interval:
                return  # a reload that keeps the timeout must not restart (starve) the sweep
            self._idle_handle.cancel()
            self._idle_handle = None
        self._idle_interval = interval
        if interval is not None:
            self._idle_handle = self.loop.call_later(interval, self._sweep_idle, interval)

    def _sweep_idle(self, interval: float) -> None:
        now = self.loop.time()
        idle = self._idle_timeout
        expired = []
        for conn in self._live():
            mark = conn.activity_mark()
            if mark != conn.idle_mark:
                conn.idle_mark = mark
                conn.idle_since = now
            elif now - conn.idle_since >= idle:
                expired.append(conn)
        for conn in expired:
            conn.shut(relay.IDLE_TIMEOUT)
        self._idle_handle = self.loop.call_later(interval, self._sweep_idle, interval)

    def cancel(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
            self._idle_interval = None

    # -- drain deadlines --

    def start_draining(self, backend: Backend, now: float, drain_timeout: float) -> None:
        deadline = now + drain_timeout
        handle = self.loop.call_at(deadline, self._drain_deadline, backend)
        backend.start_draining(deadline, handle)

    def _drain_deadline(self, backend: Backend) -> None:
        backend.drain_handle = None
        # Every connection the backend holds, connecting ones included.
        conns = list(backend.connections)
        if not conns:
            return
        step = -(-len(conns) // DRAIN_CLOSE_STEPS)
        deadline = backend.drain_deadline
        for i in range(0, len(conns), step):
            delay = DRAIN_CLOSE_WINDOW_S * (i // step) / DRAIN_CLOSE_STEPS
            self.loop.call_later(delay, self._drain_close, backend, deadline, conns[i : i + step])

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
