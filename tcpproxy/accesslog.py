"""The access log: one line per proxied connection as it ends (logger `tcpproxy.access`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tcpproxy.logs import ACCESS_LOGGER, access_handler

if TYPE_CHECKING:
    from tcpproxy.relay import Connection

access_log = logging.getLogger(ACCESS_LOGGER)


def client_text(peer: object) -> str:
    """A client address as the access log and the admin API write it: ip:port, [v6]:port."""
    if isinstance(peer, tuple):
        host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
        return f"{host}:{peer[1]}"
    return str(peer)


class AccessLog:
    def __init__(self, listener: str, loop: asyncio.AbstractEventLoop) -> None:
        self.listener = listener
        self.loop = loop
        # Lines go straight to the process's handler when nothing else wants the records.
        self.handler = access_handler()

    @staticmethod
    def enabled() -> bool:
        """Read once per listener: the access log is on or off for the life of the process."""
        return access_log.isEnabledFor(logging.INFO)

    def write(self, conn: Connection) -> None:
        # The backend it connected to: "-" for a client that never reached one.
        backend = conn.backend
        name = backend.name if backend is not None else None
        client = client_text(conn.peer)
        duration = self.loop.time() - conn.opened_at
        message = (
            f"{self.listener} {client} -> {name or '-'} up={conn.bytes_up} "
            f"down={conn.bytes_down} {duration:.3f}s {conn.reason}"
        )
        handler = self.handler
        if handler is not None and not handler.json:
            handler.access(self.loop, message, None)
            return
        fields: dict[str, object] = {
            "listener": self.listener,
            "backend": name,
            "client": client,
            "bytes_up": conn.bytes_up,
            "bytes_down": conn.bytes_down,
            "duration_s": round(duration, 6),
            "end": conn.reason,
        }
        if handler is not None:
            handler.access(self.loop, message, fields)
        else:
            access_log.info("%s", message, extra=fields)
