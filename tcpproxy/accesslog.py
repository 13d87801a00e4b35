"""The access log: one line per proxied connection as it ends (logger `tcpproxy.access`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tcpproxy.relay import Connection

access_log = logging.getLogger("tcpproxy.access")


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

    @staticmethod
    def enabled() -> bool:
        """Read once per listener: the access log is on or off for the life of the process."""
        return access_log.isEnabledFor(logging.INFO)

    def write(self, conn: Connection) -> None:
        # The backend it connected to: "-" for a client that never reached one.
        backend = conn.backend
        client = client_text(conn.peer)
        access_log.info(
            "%s %s -> %s up=%d down=%d %.3fs %s",
            self.listener,
            client,
            backend.name if backend else "-",
            conn.bytes_up,
            conn.bytes_down,
            self.loop.time() - conn.opened_at,
            conn.reason,
            extra={
                "listener": self.listener,
                "backend": backend.name if backend else None,
                "client": client,
                "bytes_up": conn.bytes_up,
                "bytes_down": conn.bytes_down,
                "duration_s": round(self.loop.time() - conn.opened_at, 6),
                "end": conn.reason,
            },
        )
