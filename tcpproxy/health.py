"""Backend health: active checks (connect, optionally send/expect) and passive ejection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from tcpproxy.backend import LOCAL_RESOURCE_ERRNOS, Backend
from tcpproxy.config import EjectionConfig, HealthCheckConfig

log = logging.getLogger("tcpproxy")

EXPECT_READ_MAX_BYTES = 4096
# A check that could not be made for want of this host's resources (descriptors, memory,
# local ports): it says nothing about the backend, so it counts neither way.
NOT_CHECKED = "not checked: out of local resources"


async def probe(backend: Backend, check: HealthCheckConfig) -> str | None:
    """One check; None when it passed, else why it failed (NOT_CHECKED: it could not be
    made here)."""
    writer = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(backend.host, backend.port)
            if check.send:
                writer.write(check.send.encode())
                await writer.drain()
            if check.expect:
                expected = check.expect.encode()
                got = b""
                while len(got) < len(expected):
                    chunk = await reader.read(EXPECT_READ_MAX_BYTES)
                    if not chunk:
                        break
                    got += chunk
                if not got.startswith(expected):
                    return f"expected {check.expect!r}, got {got[: len(expected)]!r}"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        if exc.errno in LOCAL_RESOURCE_ERRNOS:
            return NOT_CHECKED
        return exc.strerror or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return None


class HealthChecker:
    """Checks a listener's backends every interval and flips `healthy` at the thresholds.

    A backend starts healthy (traffic flows at once) and needs `unhealthy_threshold`
    failures in a row to be marked down, then `healthy_threshold` passes to come back.
    Connections already pinned to a backend are never touched by its health.
    """

    def __init__(
        self, listener: str, check: HealthCheckConfig, backends: Callable[[], Iterable[Backend]]
    ) -> None:
        self.listener = listener
        self.check = check
        self.backends = backends
        self._streaks: dict[Backend, int] = {}  # >0 passes in a row, <0 failures in a row
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            backends = list(self.backends())
            results = await asyncio.gather(*(probe(b, self.check) for b in backends))
            for backend, failure in zip(backends, results, strict=True):
                self._record(backend, failure)
            self._streaks = {b: self._streaks[b] for b in backends if b in self._streaks}
            await asyncio.sleep(self.check.interval)

    def _record(self, backend: Backend, failure: str | None) -> None:
        if failure == NOT_CHECKED:
            return
        streak = self._streaks.get(backend, 0)
        if failure is None:
            streak = streak + 1 if streak > 0 else 1
            if not backend.healthy and streak >= self.check.healthy_threshold:
                backend.healthy = True
                log.warning(
                    "backend %s/%s is healthy again",
                    self.listener,
                    backend.name,
                    extra={"listener": self.listener, "backend": backend.name, "health": "up"},
                )
        else:
            streak = streak - 1 if streak < 0 else -1
            if backend.healthy and -streak >= self.check.unhealthy_threshold:
                backend.healthy = False
                log.warning(
                    "backend %s/%s is unhealthy: %s",
                    self.listener,
                    backend.name,
                    failure,
                    extra={
                        "listener": self.listener,
                        "backend": backend.name,
                        "health": "down",
                        "reason": failure,
                    },
                )
        self._streaks[backend] = streak

    def stop(self) -> None:
        self._task.cancel()


def connect_failed(
    listener: str,
    backend: Backend,
    ejection: EjectionConfig | None,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Passive health: count a failed connect; eject after too many in a row."""
    backend.failure_streak += 1
    if ejection is None or backend.ejected:
        return
    if backend.failure_streak >= ejection.consecutive_failures:
        backend.ejected = True
        log.warning(
            "backend %s/%s ejected for %.0fs after %d failed connects in a row",
            listener,
            backend.name,
            ejection.duration,
            backend.failure_streak,
            extra={"listener": listener, "backend": backend.name, "health": "ejected"},
        )
        loop.call_later(ejection.duration, _readmit, backend)


def _readmit(backend: Backend) -> None:
    # Tried again; it takes a whole new streak of failures to be ejected again.
    backend.ejected = False
    backend.failure_streak = 0
