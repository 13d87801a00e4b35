"""The running proxy: listeners built from the routing table, reloads applied as diffs, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tcpproxy import relay
from tcpproxy.backend import Backend
from tcpproxy.config import (
    DEFAULT_MAX_CONFIG_BYTES,
    ConfigError,
    ConfigFile,
    LoadedConfig,
    read_config_file,
)
from tcpproxy.config_worker import ConfigParser
from tcpproxy.listener import Listener, Server
from tcpproxy.metrics import DEFAULT_LINGER_S, Metrics
from tcpproxy.rollout import Rollout, schedule_problems
from tcpproxy.table import ListenerPlan, Plan, Table, diff

log = logging.getLogger("tcpproxy")

# Applied and rejected reloads kept for /status and the status page's chart (newest last).
RELOAD_HISTORY = 50


def os_error_text(exc: OSError) -> str:
    """'Address already in use', not the loop's long wrapped message."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    result: str  # "success", "failure" or "unchanged"
    trigger: str
    at: float  # Unix time
    sha256: str | None
    summary: str = ""
    problems: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {
            "result": self.result,
            "trigger": self.trigger,
            "at": self.at,
            "sha256": self.sha256,
            "summary": self.summary,
            "problems": list(self.problems),
        }


class Proxy:
    def __init__(
        self,
        config_path: Path,
        metrics_linger_s: float = DEFAULT_LINGER_S,
        max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
    ) -> None:
        self.config_path = config_path
        self.max_config_bytes = max_config_bytes
        # Parses in a child process: whatever the file holds, this loop keeps relaying.
        self.parser = ConfigParser()
        self.file: ConfigFile | None = None  # what the last reload read
        self.table = Table()
        self.listeners: dict[str, Listener] = {}
        self.retired: dict[str, Listener] = {}  # removed from the config, still draining
        self.metrics = Metrics(self.all_backends, metrics_linger_s, self._rollouts)
        self.applied: LoadedConfig | None = None
        self.loaded_at: float | None = None
        self.last_reload: ReloadResult | None = None
        self.last_failure: ReloadResult | None = None
        self.reloads: deque[ReloadResult] = deque(maxlen=RELOAD_HISTORY)
        self.shutting_down = False
        self._lock = asyncio.Lock()

    # -- views --

    def all_listeners(self) -> Iterator[Listener]:
        yield from self.listeners.values()
        yield from self.retired.values()

    def _rollouts(self) -> Iterator[tuple[str, Rollout]]:
        for listener in self.listeners.values():
            if listener.rollout is not None:
                yield listener.name, listener.rollout

    def all_backends(self) -> Iterator[Backend]:
        for listener in self.all_listeners():
            yield from listener.all_backends()

    @property
    def ready(self) -> bool:
        return self.applied is not None and not self.shutting_down

    @property
    def open_connections(self) -> int:
        return sum(lst.open_connections for lst in self.all_listeners())

    # -- config --

    def read_config(self) -> ConfigFile:
        """The config file's bytes (bounded: see read_config_file); ConfigError if unusable."""
        return read_config_file(self.config_path, self.max_config_bytes)

    async def start(self) -> None:
        """Apply the config file for the first time; ConfigError if it is bad or cannot bind."""
        try:
            file = self.read_config()
            loaded = await self.parser.parse(file.data, str(self.config_path))
            self.file = file
            await self._apply(loaded)
        except BaseException:
            await self.parser.close()
            raise
        self._record(ReloadResult("success", "startup", time.time(), loaded.sha256))

    async def reload(self, trigger: str, file: ConfigFile | None = None) -> ReloadResult:
        """Reload the file (or `file`, already read) if its bytes changed. A bad file never
        replaces the running config."""
        async with self._lock:
            if self.shutting_down:
                return self._stopping(trigger)
            if file is None:
                try:
                    file = self.read_config()
                except ConfigError as exc:
                    return self._failed(trigger, None, exc.problems)
            self.file = file
            sha256 = file.sha256
            if self.applied is not None and sha256 == self.applied.sha256:
                if self.last_failure is not None:
                    # A bad file was put back to the running config: nothing to apply, but
                    # the failure is over.
                    result = ReloadResult(
                        "success", trigger, time.time(), sha256, "back to the running config"
                    )
                    self._record(result)
                    return result
                if trigger in ("sighup", "admin"):
                    # Asked for by someone: say it was heard (the watch and poll stay quiet).
                    log.info(
                        "config unchanged from %s sha256=%s (%s): nothing to apply",
                        self.config_path,
                        sha256,
                        trigger,
                        extra={"sha256": sha256, "result": "unchanged", "trigger": trigger},
                    )
                return ReloadResult("unchanged", trigger, time.time(), sha256, "no change")
            failure = self.last_failure
            if (
                trigger in ("watch", "poll")
                and failure is not None
                and failure.sha256 == sha256
                and self.last_reload is failure
            ):
                return failure  # the same bad bytes seen again: already reported and counted
            try:
                loaded = await self.parser.parse(file.data, str(self.config_path))
                if self.shutting_down:  # the parse was cut short by shutdown, or outlived it
                    return self._stopping(trigger)
                plan = await self._apply(loaded)
                for warning in loaded.warnings():
                    log.warning(warning)
            except ConfigError as exc:
                if self.shutting_down:
                    return self._stopping(trigger)
                return self._failed(trigger, sha256, exc.problems)
            result = ReloadResult("success", trigger, time.time(), sha256, plan.summary())
            self._record(result)
            return result

    @staticmethod
    def _stopping(trigger: str) -> ReloadResult:
        return ReloadResult("unchanged", trigger, time.time(), None, "shutting down")

    def _failed(self, trigger: str, sha256: str | None, problems: list[str]) -> ReloadResult:
        failure = self.last_failure
        if (
            trigger in ("watch", "poll")
            and sha256 is None
            and failure is not None
            and failure.sha256 is None
            and failure.problems == tuple(problems)
            and self.last_reload is failure
        ):
            return failure  # still missing or unreadable: reported once
        result = ReloadResult("failure", trigger, time.time(), sha256, "", tuple(problems))
        self._record(result)
        return result

    def _record(self, result: ReloadResult) -> None:
        self.last_reload = result
        self.reloads.append(result)
        m = self.metrics
        m.reloads.labels(result.result).inc()
        if result.result == "success":
            self.last_failure = None
            self.loaded_at = result.at
            m.last_reload_successful.set(1)
            m.last_reload_success_timestamp.set(result.at)
            log.info(
                "config applied from %s sha256=%s (%s): %s",
                self.config_path,
                result.sha256,
                result.trigger,
                result.summary or "initial config",
                extra={"sha256": result.sha256, "result": "success", "trigger": result.trigger},
            )
        else:
            self.last_failure = result
            m.last_reload_successful.set(0)
            for problem in result.problems:
                log.error(
                    "config rejected, old config keeps serving: %s",
                    problem,
                    extra={"sha256": result.sha256, "result": "failure", "trigger": result.trigger},
                )

    async def _apply(self, loaded: LoadedConfig) -> Plan:
        running = {lst.name: lst.rollout.identity for lst in self.listeners.values() if lst.rollout}
        if problems := schedule_problems(loaded.config, loaded.source, time.time(), running):
            raise ConfigError(problems)
        new_table = Table.from_config(loaded.config)
        draining = frozenset(key for lst in self.all_listeners() for key in lst.draining)
        plan = diff(self.table, new_table, draining)

        # Bind every new address before changing anything, so that a bind failure leaves the
        # running config untouched.
        staged: dict[str, tuple[Listener, Server]] = {}
        index = {lst.name: i for i, lst in enumerate(loaded.config.listeners)}
        try:
            for lp in plan.listeners:
                if lp.kind == "added" or lp.rebound:
                    name = lp.config.name
                    listener = (
                        self.listeners.get(name)
                        or self.retired.get(name)
                        or Listener(lp.config, self.metrics, self._retired_empty)
                    )
                    try:
                        server = await listener.bind(lp.config)
                    except OSError as exc:
                        reason = os_error_text(exc)
                        raise ConfigError(
                            [
                                f"{loaded.source}: listeners[{index[name]}].bind: "
                                f"cannot listen on {lp.config.bind}: {reason}"
                            ]
                        ) from None
                    staged[name] = (listener, server)
        except ConfigError:
            for _, server in staged.values():
                server.close()
            raise

        # Commit: no await until every listener has its new state.
        for lp in plan.listeners:
            self._commit(lp, staged)
        self.table = new_table
        self.applied = loaded
        for _, server in staged.values():
            await server.start_serving()
        return plan

    def _commit(self, lp: ListenerPlan, staged: dict[str, tuple[Listener, Server]]) -> None:
        name = lp.config.name
        if lp.kind == "removed":
            listener = self.listeners.pop(name)
            listener.stop_accepting()
            listener.apply(lp)
            self.retired[name] = listener
            self._retired_empty(listener)
            return
        if lp.kind == "added":
            listener = staged[name][0]
            self.retired.pop(name, None)
            self.listeners[name] = listener
        else:
            listener = self.listeners[name]
        if name in staged:
            listener.serve(staged[name][1])
        if not lp.is_noop or lp.kind == "added":
            listener.apply(lp)

    def _retired_empty(self, listener: Listener) -> None:
        if listener.retired and listener.drained:
            listener.cancel_timers()
            if self.retired.get(listener.name) is listener:
                del self.retired[listener.name]

    # -- shutdown --

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, give live connections `grace_s` seconds to end, close the rest."""
        self.shutting_down = True
        for listener in self.all_listeners():
            listener.stop_accepting()
        self.parser.stop()  # a parse under way is of no use now
        waits = []
        for listener in self.all_listeners():
            if listener.open_connections:
                listener.on_empty.clear()
                waits.append(asyncio.ensure_future(listener.on_empty.wait()))
        if waits:
            log.info(
                "shutting down: waiting up to %.1fs for %d connections",
                grace_s,
                self.open_connections,
            )
            _, pending = await asyncio.wait(waits, timeout=grace_s)
            for fut in pending:
                fut.cancel()
        for listener in list(self.all_listeners()):
            listener.close_all(relay.SHUTDOWN)
            listener.cancel_timers()
        await self.parser.close()
