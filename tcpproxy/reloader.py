"""Reload triggers: a watch on the config file's directory, SIGHUP, and a slow poll.

The directory is watched, not the file: a Kubernetes ConfigMap update swaps the `..data`
symlink (the file's own inode never changes), and editors save by writing a new file and
renaming it over the old one, which a watch on the old inode never sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import watchfiles

from tcpproxy.proxy import Proxy

log = logging.getLogger("tcpproxy")

# Events closer together than this are one change (an editor's write+rename, a ConfigMap
# swap's several renames); short, because it adds directly to reload latency.
WATCH_DEBOUNCE_MS = 50
WATCH_STEP_MS = 25


class Reloader:
    def __init__(self, proxy: Proxy, poll_interval_s: float, watch: bool = True) -> None:
        self.proxy = proxy
        self.watch = watch
        self.poll_interval_s = poll_interval_s
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.watch:
            self._tasks.append(loop.create_task(self._watch()))
        if self.poll_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll()))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.trigger, "sighup")

    def trigger(self, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self._reload(why))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _reload(self, why: str) -> None:
        try:
            await self.proxy.reload(why)
        except Exception:
            log.exception("reload failed unexpectedly (%s)", why)

    async def _watch(self) -> None:
        directory = self.proxy.config_path.absolute().parent
        while not self._stop.is_set():
            try:
                async for _ in watchfiles.awatch(
                    directory,
                    stop_event=self._stop,
                    debounce=WATCH_DEBOUNCE_MS,
                    step=WATCH_STEP_MS,
                    recursive=False,
                    watch_filter=None,
                    ignore_permission_denied=True,
                ):
                    await self._reload("watch")
            except (FileNotFoundError, OSError, RuntimeError) as exc:
                # The directory itself went away (or cannot be watched): keep polling, and try
                # to watch again later.
                log.warning("cannot watch %s: %s; relying on polling", directory, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=max(self.poll_interval_s, 5))

    async def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.poll_interval_s)
            if not self._stop.is_set():
                await self._reload("poll")

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
