"""Reload triggers: a watch on the config file's directory, SIGHUP, and a slow poll.

The directory is watched, not the file: a Kubernetes ConfigMap update swaps the `..data`
symlink (the file's own inode never changes), and editors save by writing a new file and
renaming it over the old one, which a watch on the old inode never sees.

What the watch and the poll find is applied at once when the path leads to a new file (a
rename over it, a `..data` swap, a new file): a new file is complete when it appears. A file
written in place (same inode, new bytes) may be half-written, so it is applied only once it
has stayed the same (size, mtime, sha256) for `settle_s`. SIGHUP and POST /-/reload apply
what the file holds at once: they are someone saying the file is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import watchfiles

from tcpproxy.config import DEFAULT_CONFIG_SETTLE_S, ConfigError, ConfigFile
from tcpproxy.proxy import Proxy

log = logging.getLogger("tcpproxy")

# Events closer together than this are one change (an editor's write+rename, a ConfigMap
# swap's several renames); short, because it adds directly to reload latency.
WATCH_DEBOUNCE_MS = 50
WATCH_STEP_MS = 25


def _identity(file: ConfigFile) -> tuple[int, int, int, int, str]:
    return (file.device, file.inode, len(file.data), file.mtime_ns, file.sha256)


class Reloader:
    def __init__(
        self,
        proxy: Proxy,
        poll_interval_s: float,
        watch: bool = True,
        settle_s: float = DEFAULT_CONFIG_SETTLE_S,
    ) -> None:
        self.proxy = proxy
        self.watch = watch
        self.poll_interval_s = poll_interval_s
        self.settle_s = settle_s
        self.settles = 0  # in-place writes waited for (each counted when the wait begins)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._settling: asyncio.Task[None] | None = None
        self._settle_waiting = False  # the settle task has not begun its reload yet
        self._written = asyncio.Event()  # the file changed again while settling

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.watch:
            self._tasks.append(loop.create_task(self._watch()))
        if self.poll_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll()))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.trigger, "sighup")

    def trigger(self, why: str) -> None:
        """Reload now (SIGHUP, start-up catch-up): applied at once, settled or not."""
        self._spawn(self._reload(why))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
        return task

    async def _reload(self, why: str, file: ConfigFile | None = None) -> None:
        try:
            if file is None:
                await self.proxy.reload(why)
            else:
                await self.proxy.reload(why, file)  # exactly the bytes that settled
        except Exception:
            log.exception("reload failed unexpectedly (%s)", why)

    async def _changed(self, trigger: str) -> None:
        """The watch saw something in the directory, or it is time to poll."""
        try:
            file = self.proxy.read_config()
        except ConfigError:
            await self._reload(trigger)  # missing, too large...: reported (once) by the reload
            return
        last = self.proxy.file
        in_place = (
            self.settle_s > 0
            and last is not None
            and (file.device, file.inode) == (last.device, last.inode)
            and file.sha256 != last.sha256
        )
        if in_place:
            if self._settling is None or self._settling.done():
                self._settling = self._spawn(self._settle(trigger, file))
            else:
                self._written.set()
            return
        if self._settling is not None and self._settle_waiting:
            self._settling.cancel()  # replaced while being written: the new file wins
        await self._reload(trigger)

    async def _settle(self, trigger: str, file: ConfigFile) -> None:
        """Apply a file written in place once it has stayed the same for settle_s."""
        self.settles += 1
        self._settle_waiting = True
        log.info(
            "config %s written in place: applied once unchanged for %gs",
            self.proxy.config_path,
            self.settle_s,
            extra={"trigger": trigger},
        )
        loop = asyncio.get_running_loop()
        changed_at = loop.time()
        settled: ConfigFile | None = None
        try:
            while True:
                self._written.clear()
                left = changed_at + self.settle_s - loop.time()
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._written.wait(), left)
                try:
                    now = self.proxy.read_config()
                except ConfigError:
                    break  # gone or unusable now: the reload reads it again and reports it
                if _identity(now) != _identity(file):
                    file, changed_at = now, loop.time()  # written again: wait anew
                elif loop.time() >= changed_at + self.settle_s:
                    settled = file
                    break
        finally:
            self._settle_waiting = False
        await self._reload(trigger, settled)

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
                    await self._changed("watch")
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
                await self._changed("poll")

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
