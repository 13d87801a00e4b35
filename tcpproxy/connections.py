"""The old name of tcpproxy.backend, for relay.py's type-only import until it imports that."""

from __future__ import annotations

from tcpproxy.backend import Backend

__all__ = ["Backend"]
