"""`tcpproxy run`: the proxy, its admin server and its reloader in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from tcpproxy import limits
from tcpproxy.admin import AdminOptions, start_admin
from tcpproxy.config import ConfigError
from tcpproxy.logs import plural
from tcpproxy.proxy import Proxy, os_error_text
from tcpproxy.reloader import Reloader
from tcpproxy.settings import Settings

log = logging.getLogger("tcpproxy")
T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, on plain asyncio otherwise."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


class Signals:
    """SIGTERM, SIGINT and SIGHUP as the proxy handles them from its first moment on the event
    loop (before the config is read and listeners bound) until it exits: the first SIGTERM
    or SIGINT sets `stop`, any later one `hurry`. SIGHUP, while the reloader does not have it,
    is remembered during start-up (the reloader then reloads) and ignored once shutting down:
    its default action would kill the process."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.reload_pending = False
        for sig in STOP_SIGNALS:
            self.loop.add_signal_handler(sig, self._on_stop)
        self.hold_sighup()

    def _on_stop(self) -> None:
        if not self.stop.is_set():
            self.stop.set()
        elif not self.hurry.is_set():
            log.warning("second signal: closing all connections now")
            self.hurry.set()

    def hold_sighup(self) -> None:
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_hup(self) -> None:
        if self.stop.is_set():
            log.info("SIGHUP ignored: shutting down")
        else:
            self.reload_pending = True

    def close(self) -> None:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            self.loop.remove_signal_handler(sig)
        # The process is on its way out: a late SIGHUP must not turn exit 0 into a kill.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def wait_for_stop_signal(on_second: Callable[[], None] | None = None) -> None:
    """Return on the first SIGTERM or SIGINT; call `on_second` on any later one."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def handler() -> None:
        if stop.is_set():
            if on_second is not None:
                on_second()
        else:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)
    await stop.wait()


async def serve(
    settings: Settings,
    started: Callable[[Proxy], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    signals = Signals()
    try:
        return await _serve(settings, started, signals)
    finally:
        signals.close()


async def _serve(
    settings: Settings,
    started: Callable[[Proxy], Awaitable[None]] | None,
    signals: Signals,
) -> int:
    limits.raise_open_files_limit()
    proxy = Proxy(settings.config, settings.metrics_linger, settings.max_config_size)
    try:
        await proxy.start()
    except ConfigError as exc:
        for problem in settings.hint_missing_config(exc.problems):
            print(problem, file=sys.stderr)
        return 1
    if proxy.applied is not None:
        limits.check_at_start(proxy.applied.config.listeners)
    runner = None
    if settings.admin != "off":
        try:
            runner = await start_admin(proxy, settings.admin, AdminOptions.from_settings(settings))
        except OSError as exc:
            origin = settings.origin("admin")
            if origin is None:
                where = f"the admin server's default address {settings.admin}"
            else:
                where = f"{origin}{' ' if origin.startswith('--') else '='}{settings.admin}"
            print(
                f"{where}: cannot listen: {os_error_text(exc)}"
                + ("" if origin else " (choose another with --admin HOST:PORT, or --admin off)"),
                file=sys.stderr,
            )
            await proxy.shutdown(0)
            return 1
    reloader = Reloader(
        proxy, settings.poll_interval, watch=settings.watch, settle_s=settings.config_settle
    )
    reloader.start()
    if signals.reload_pending:
        # A SIGHUP came while starting: the file may have changed after it was read.
        reloader.trigger("sighup")
    binds = ", ".join(f"{lst.name}={lst.config.bind}" for lst in proxy.listeners.values())
    log.info(
        "tcpproxy serving %s; admin %s; config %s",
        binds,
        settings.admin,
        settings.config,
    )
    if started is not None:
        await started(proxy)

    await signals.stop.wait()
    log.info("shutting down")
    stopping = asyncio.ensure_future(reloader.stop())
    # The reloader's first step gives SIGHUP back to its default action, which kills: take
    # it back straight after (this callback runs next, before any signal is read).
    signals.loop.call_soon(signals.hold_sighup)
    await stopping
    signals.hold_sighup()
    # A second signal, even one that came with the first, ends the wait for connections.
    grace = 0.0 if signals.hurry.is_set() else settings.shutdown_timeout
    if grace and proxy.open_connections:
        log.warning(
            "waiting up to %gs for %s to finish; a second Ctrl-C (SIGINT or SIGTERM) "
            "closes them now",
            grace,
            plural(proxy.open_connections, "open connection"),
        )
    shutdown = asyncio.ensure_future(proxy.shutdown(grace))
    hurried = asyncio.ensure_future(signals.hurry.wait())
    await asyncio.wait((shutdown, hurried), return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if not shutdown.done():
        for listener in proxy.all_listeners():
            listener.on_empty.set()  # what proxy.shutdown waits for: it closes the rest
    await shutdown
    if runner is not None:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    log.info("stopped")
    return 0
