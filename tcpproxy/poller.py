"""The reactor: one edge-triggered epoll set per event loop for every proxied socket.

Why not the loop's add_reader/add_writer: uvloop makes a poll handle per descriptor and every
add or remove costs one to three epoll_ctl calls, a dozen per connection. Here a socket is
registered once, for both directions, and closing it unregisters it.
"""

from __future__ import annotations

import asyncio
import logging
import select
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tcpproxy.relay import Connection, Direction

log = logging.getLogger("tcpproxy")

# The loop's read buffer: one read of any connection (relay.READ_CHUNK_BYTES).
BUFFER_BYTES = 256 * 1024
_MAX_EVENTS = 512
_WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class Poller:
    """One edge-triggered epoll set for a loop's proxied sockets, itself watched by the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the loop (the registry's key) must not be kept alive by its own poller.
        self.loop: asyncio.AbstractEventLoop = weakref.proxy(loop)
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        # Descriptors closed during the batch being dispatched: their remaining events in
        # it are stale (and the number may already belong to a new socket).
        self._closed: set[int] = set()
        # Every read of this loop lands here and is written on at once; only an unsent rest
        # is copied out. One per poller, never shared: recv_into and send release the GIL,
        # so two loops in two threads would write into each other's bytes.
        self.buffer = bytearray(BUFFER_BYTES)
        self.view = memoryview(self.buffer)
        self.writes: list[tuple[Connection, Direction]] = []  # held until the batch's end
        self.dispatching = False  # (a read outside a batch is written at once)
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Poller:
        poller = _POLLERS.get(loop)
        if poller is None:
            poller = _POLLERS[loop] = cls(loop)
        return poller

    def watch(self, fd: int, handler: Callable[[int], None]) -> None:
        self._epoll.register(fd, _WATCH)
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Call before closing fd."""
        del self._handlers[fd]
        self._closed.add(fd)

    def _dispatch(self) -> None:
        closed = self._closed
        closed.clear()
        handlers = self._handlers
        self.dispatching = True
        try:
            for fd, events in self._epoll.poll(0, _MAX_EVENTS):
                if fd not in closed:
                    handler = handlers[fd]
                    try:
                        handler(events)
                    except Exception as exc:  # a bug: end that connection, run the rest
                        _handler_failed(handler, exc)
            # Small reads were held back (Connection._pump): write them now, after every read
            # of the batch, so the peers we wake do not preempt us between reads.
            writes = self.writes
            while writes:
                conn, d = writes.pop()
                try:
                    conn.flush_batched(d)
                except Exception as exc:
                    conn.fail(exc)
        finally:
            self.dispatching = False


def _handler_failed(handler: Callable[[int], None], exc: Exception) -> None:
    fail = getattr(getattr(handler, "__self__", None), "fail", None)  # a Connection's
    if fail is not None:
        fail(exc)
    else:
        log.error("tcpproxy: error handling socket events", exc_info=exc)


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()
