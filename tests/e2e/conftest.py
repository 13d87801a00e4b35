from __future__ import annotations

from tests.e2e.processes import echo_backends  # a fixture for every e2e module

__all__ = ["echo_backends"]
