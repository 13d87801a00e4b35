"""The acceptor: a listening socket whose accepted sockets become connections."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable

from tcpproxy.poller import Poller
from tcpproxy.relay import Connection, Owner, Socket


class Server:
    """A listening socket; each accepted socket becomes a `conn_class` connection."""

    def __init__(
        self, owner: Owner, host: str, port: int, backlog: int, conn_class: type[Connection]
    ) -> None:
        self.owner = owner
        self.conn_class = conn_class
        self.loop = asyncio.get_running_loop()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Accepted sockets inherit it (Linux): no setsockopt per client.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.bind(address)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.family = family
        self._serving = False
        self._accepting = True  # the owner's say: False at its max_connections
        self._backing_off = False  # out of descriptors, even the spare one
        self._reading = False  # the listening socket is in the loop's reader set
        self.poller = Poller.of(self.loop)
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    async def start_serving(self) -> None:
        if not self._serving and self.sock.fileno() >= 0:
            self._serving = True
            self._watch()

    def set_accepting(self, accepting: bool) -> None:
        """Stop (or go back to) taking clients off the listen queue. Stopped, the kernel
        still completes handshakes into the queue, and the clients wait there."""
        self._accepting = accepting
        self._watch()

    def _watch(self) -> None:
        want = self._serving and self._accepting and not self._backing_off
        if want != self._reading and self.sock.fileno() >= 0:
            self._reading = want
            if want:
                self.loop.add_reader(self.sock.fileno(), self._accept)
            else:
                self.loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        # The C socket's accept: socket.socket.accept wraps it in Python (relay.Socket).
        accept: Callable[[], tuple[int, object]] = self.sock._accept  # type: ignore[attr-defined]
        family = self.family
        make = Socket
        for _ in range(64):  # bounded per wake-up, so one busy listener cannot starve the loop
            if not self._reading:
                return  # the owner stopped accepting (at max_connections)
            try:
                fd, peername = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.owner.accept_failed(exc)
                    self._shed()
                return
            sock = make(family, socket.SOCK_STREAM, 0, fd)
            try:
                sock.setblocking(False)
            except OSError:
                sock.close()  # reset before we got to it
                continue
            self.owner.connection_opened(self.conn_class(self.owner, sock, self.poller, peername))

    def _shed(self) -> None:
        """Out of descriptors: close the waiting clients at once (they hear a close now,
        rather than hang in the backlog), using the spare descriptor kept for this."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.sock.accept()[0].close()
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if self._spare is None:
            # Not even that: stop accepting for a moment instead of spinning.
            self._backing_off = True
            self._watch()
            self.loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        self._backing_off = False
        self._watch()

    def close(self) -> None:
        self._serving = False
        self._watch()
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
