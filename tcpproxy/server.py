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
from tcpproxy.proxy import Proxy, os_error_text
from tcpproxy.reloader import Reloader
from tcpproxy.settings import Settings

log = logging.getLogger("tcpproxy")
T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, on plain asyncio otherwise."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


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
    limits.raise_open_files_limit()
    proxy = Proxy(settings.config, settings.metrics_linger)
    try:
        await proxy.start()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if proxy.applied is not None:
        limits.check_at_start(proxy.applied.config.listeners)
    runner = None
    if settings.admin != "off":
        try:
            runner = await start_admin(proxy, settings.admin, AdminOptions.from_settings(settings))
        except OSError as exc:
            print(f"--admin {settings.admin}: cannot listen: {os_error_text(exc)}", file=sys.stderr)
            await proxy.shutdown(0)
            return 1
    reloader = Reloader(proxy, settings.poll_interval, watch=settings.watch)
    reloader.start()
    binds = ", ".join(f"{lst.name}={lst.config.bind}" for lst in proxy.listeners.values())
    log.info(
        "tcpproxy serving %s; admin %s; config %s",
        binds,
        settings.admin,
        settings.config,
    )
    if started is not None:
        await started(proxy)

    shutdown_task: asyncio.Task[None] | None = None

    def hurry() -> None:
        # A second Ctrl-C: stop waiting for connections to finish.
        log.warning("second signal: closing all connections now")
        if shutdown_task is not None:
            for listener in proxy.all_listeners():
                listener.on_empty.set()

    await wait_for_stop_signal(hurry)
    log.info("shutting down")
    await reloader.stop()
    shutdown_task = asyncio.ensure_future(proxy.shutdown(settings.shutdown_timeout))
    await shutdown_task
    if runner is not None:
        with contextlib.suppress(Exception):
            await runner.cleanup()
    log.info("stopped")
    return 0
