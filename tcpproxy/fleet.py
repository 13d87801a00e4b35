"""The fleet's judge of a rollout: a Prometheus that scrapes every replica answers two
questions on a fixed cadence, the same for every replica that asks:

- has any replica aborted this rollout (its `tcpproxy_rollout_aborted{rollout=ID}`)?
- is the failure ratio of connects to `to`, summed over every replica over the window,
  above the limit?

Prometheus down, slow or answering nonsense decides nothing: the replica judges on its own
connects meanwhile (one log line per outage). The queries are built here, pure; the HTTP
client is aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from tcpproxy.config import PrometheusJudgeConfig, RolloutConfig

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

log = logging.getLogger("tcpproxy")

ABORTED_METRIC = "tcpproxy_rollout_aborted"
# How far back an abort reported by any replica still counts: a replica started (or every
# one restarted) long after the abort still learns of it.
ABORT_LOOKBACK = "1d"


def promql_duration(seconds: float) -> str:
    """A PromQL range: whole seconds when exact, else milliseconds."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def matchers(selector: str, **labels: str) -> str:
    """`{a="x",b="y",<selector>}`: the labels given, then the user's extra matchers."""
    parts = [f'{key}="{_label_value(value)}"' for key, value in labels.items()]
    if selector.strip():
        parts.append(selector.strip())
    return "{" + ",".join(parts) + "}"


def failure_query(listener: str, config: RolloutConfig) -> str:
    """The failure ratio of connection attempts to `to` over every replica over the abort
    window; no result (so no decision) until there were `min_attempts` attempts."""
    abort = config.abort
    assert abort.prometheus is not None
    if abort.prometheus.query is not None:
        return abort.prometheus.query
    where = matchers(abort.prometheus.selector, listener=listener, backend=config.to)
    window = promql_duration(abort.window)
    failures = f"sum(increase(tcpproxy_backend_connect_failures_total{where}[{window}]))"
    connected = f"sum(increase(tcpproxy_connections_total{where}[{window}]))"
    attempts = f"({connected} + {failures})"
    return f"({failures} / {attempts}) and on() ({attempts} >= {abort.min_attempts})"


def aborted_query(identity: str, prometheus: PrometheusJudgeConfig) -> str:
    """1 when any replica reported an abort of the rollout `identity` lately, else none."""
    where = matchers(prometheus.selector, rollout=identity)
    return f"max(max_over_time({ABORTED_METRIC}{where}[{ABORT_LOOKBACK}])) > 0"


class QueryError(Exception):
    pass


def query_value(body: Any) -> float | None:
    """The number a query API answer holds: a scalar, or the largest sample of a vector;
    None for an empty vector (nothing to decide on). QueryError for anything else."""
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise QueryError(f"query failed: {error or 'not a query API answer'}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise QueryError("query answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            values = [float(result[1])]  # type: ignore[index]
        elif kind == "vector":
            values = [float(sample["value"][1]) for sample in result]  # type: ignore[union-attr]
        else:
            raise QueryError(f"expected a scalar or an instant vector, got {kind!r}")
    except (TypeError, KeyError, IndexError, ValueError):
        raise QueryError("malformed query answer") from None
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else None


def decide(
    aborted: float | None, ratio: float | None, max_failure_ratio: float, to: str
) -> str | None:
    """Why to abort on the fleet's answers, or None."""
    if aborted is not None and aborted > 0:
        return "another replica aborted this rollout"
    if ratio is not None and ratio > max_failure_ratio:
        return (
            f"{ratio:.0%} of the fleet's connection attempts to {to} failed "
            f"(more than {max_failure_ratio:.0%})"
        )
    return None


class FleetJudge:
    """Asks Prometheus every `interval` for one listener's rollout. `on_abort(reason)` when
    the fleet says abort; `on_answer(ok)` after every evaluation, ok False during an
    outage (the caller judges locally meanwhile)."""

    def __init__(
        self,
        listener: str,
        identity: str,
        config: RolloutConfig,
        *,
        up: Gauge,
        errors: Counter,
        on_abort: Callable[[str], None],
        on_answer: Callable[[bool], None],
    ) -> None:
        assert config.abort.prometheus is not None
        self.listener = listener
        self.prometheus = config.abort.prometheus
        self.queries = (aborted_query(identity, self.prometheus), failure_query(listener, config))
        self.max_failure_ratio = config.abort.max_failure_ratio
        self.to = config.to
        self.answering = False
        self._outage: str | None = None
        self._up = up.labels(listener)
        self._errors = errors.labels(listener)
        self._up_gauge = up
        self._on_abort = on_abort
        self._on_answer = on_answer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with contextlib.suppress(KeyError):  # never asked yet
            self._up_gauge.remove(self.listener)

    async def _run(self) -> None:
        # Each evaluation is bounded as a whole (evaluate), not each request.
        async with aiohttp.ClientSession() as session:
            while True:
                await self.evaluate(session)
                await asyncio.sleep(self.prometheus.interval)

    async def _query(self, session: aiohttp.ClientSession, query: str) -> float | None:
        url = f"{self.prometheus.url}/api/v1/query"
        async with session.get(url, params={"query": query}) as response:
            if response.status >= 500 or response.status in (401, 403, 404):
                raise QueryError(f"HTTP {response.status} {response.reason or ''}".strip())
            try:
                body = await response.json(content_type=None)
            except ValueError:
                raise QueryError(f"HTTP {response.status}: not JSON") from None
            return query_value(body)

    async def evaluate(self, session: aiohttp.ClientSession) -> None:
        try:
            async with asyncio.timeout(self.prometheus.timeout):
                aborted = await self._query(session, self.queries[0])
                ratio = await self._query(session, self.queries[1])
        except (aiohttp.ClientError, OSError, QueryError, TimeoutError) as exc:
            self._failed(exc)
            return
        if self._outage is not None:
            log.info(
                "%s: rollout judge: Prometheus at %s answers again: judging on the fleet",
                self.listener,
                self.prometheus.url,
                extra={"listener": self.listener, "prometheus": "up"},
            )
            self._outage = None
        self.answering = True
        self._up.set(1)
        reason = decide(aborted, ratio, self.max_failure_ratio, self.to)
        if reason is not None:
            self._on_abort(reason)
        self._on_answer(True)

    def _failed(self, exc: BaseException) -> None:
        text = "no answer within the timeout" if isinstance(exc, TimeoutError) else str(exc)
        self._errors.inc()
        self._up.set(0)
        self.answering = False
        if self._outage is None:
            # Once per outage: a Prometheus down for an hour is one line, not 360.
            log.warning(
                "%s: rollout judge: Prometheus at %s does not answer (%s): judging on this "
                "replica's own connects until it does",
                self.listener,
                self.prometheus.url,
                text or type(exc).__name__,
                extra={"listener": self.listener, "prometheus": "down"},
            )
            self._outage = text
        self._on_answer(False)
