"""The acceptor: a listening socket whose accepted sockets become connections."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket

from tcpproxy.poller import Poller
from tcpproxy.relay import Connection, Owner


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
            self.sock.bind(address)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._serving = False
        self.poller = Poller.of(self.loop)
        self._spare: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    async def start_serving(self) -> None:
        if not self._serving and self.sock.fileno() >= 0:
            self._serving = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # bounded per wake-up, so one busy listener cannot starve the loop
            try:
                sock, peername = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.owner.accept_failed(exc)
                    self._shed()
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(0.1, self._resume)

    def _resume(self) -> None:
        if self._serving and self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._serving:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self._serving = False
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
