"""tcpproxy: a TCP proxy that shifts traffic between service versions by weights."""

from __future__ import annotations

__version__ = "0.1.0"
