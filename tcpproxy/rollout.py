"""Progressive rollout: move new connections from backend A to B in timed steps, abort on
failures. Pure: the caller passes the time and the counters; no I/O, no asyncio.

The schedule is a function of the config file's fields (started_at, paused_at, paused_for)
and the clock, so a restarted proxy, and every replica that reads the same file, lands on
the same step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from tcpproxy.config import RolloutConfig, RouteConfig

RUNNING = "running"
PAUSED = "paused"
COMPLETED = "completed"
ABORTED = "aborted"
STATES = (RUNNING, PAUSED, COMPLETED, ABORTED)
# The time line kept for the status page's chart: this many step starts and pauses.
TIMELINE_ENTRIES = 64


def step_at(steps: tuple[int, ...], step_duration_s: float, elapsed_s: float) -> int:
    """Index of the step in force after `elapsed_s` of running; len(steps) once done."""
    if elapsed_s <= 0:
        return 0
    return min(int(elapsed_s // step_duration_s), len(steps))


def pair_weights(weights: Mapping[str, int], from_: str, to: str, share: int) -> dict[str, int]:
    """The balancer's weights under a rollout at `share` percent to `to`: `from` and `to`
    split the weight they hold together (share : 100 - share), every other backend keeps its
    own, so bystanders' shares stay as configured. Reduced by their greatest common divisor,
    so that the balancer's exact cycle (the sum of the weights) stays short."""
    pair = weights[from_] + weights[to]
    out = {name: weight * 100 for name, weight in weights.items()}
    out[from_] = pair * (100 - share)
    out[to] = pair * share
    divisor = math.gcd(*out.values()) or 1
    return {name: weight // divisor for name, weight in out.items()}


def failure_ratio(attempts: int, failures: int) -> float:
    return failures / attempts if attempts else 0.0


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    attempts: int  # cumulative connection attempts to B
    failures: int  # cumulative failed attempts to B


def abort_reason(
    window: deque[Sample], now: Sample, max_ratio: float, min_attempts: int
) -> str | None:
    """Why to abort given B's counters now and over the window (oldest sample first)."""
    if not window:
        return None
    oldest = window[0]
    attempts = now.attempts - oldest.attempts
    failures = now.failures - oldest.failures
    if attempts >= min_attempts and failure_ratio(attempts, failures) > max_ratio:
        return (
            f"{failures} of {attempts} connection attempts to the new backend failed "
            f"(more than {max_ratio:.0%})"
        )
    return None


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def elapsed_at(started_at: float, paused_for: float, paused_at: float | None, now: float) -> float:
    """Running time at `now` of a schedule begun at `started_at`, that spent `paused_for`
    paused before and is held since `paused_at` (None: running). A pure function of the
    file's fields and the clock: every replica that reads them computes the same."""
    until = now if paused_at is None else min(now, paused_at)
    return max(0.0, until - started_at - paused_for)


def schedule_problem(config: RolloutConfig, now: float) -> str | None:
    """Why a rollout first seen at `now` must not start: its whole schedule already lies
    in the past, so it would send all of the pair's share to `to` at once."""
    if config.started_at is None or config.completed or config.aborted_at is not None:
        return None
    started_at = config.started_at.timestamp()
    elapsed = elapsed_at(started_at, config.paused_for, _ts(config.paused_at), now)
    length = len(config.steps) * config.step_duration
    if elapsed < length:
        return None
    ago = format_seconds(elapsed - length)
    return (
        f"the whole schedule ({len(config.steps)} steps of "
        f"{format_seconds(config.step_duration)}) ended {ago} ago, so every new connection "
        f"of the pair would go to {config.to!r} at once; set a later started_at, remove it to "
        "start now, or add 'completed: true' to keep it completed"
    )


def schedule_problems(
    config: RouteConfig, source: str, now: float, running: Mapping[str, str] | None = None
) -> list[str]:
    """One line per rollout that must not start (see schedule_problem), skipping those this
    process already runs (`running`: listener -> rollout identity), which may complete."""
    problems = []
    for i, listener in enumerate(config.listeners):
        rollout = listener.rollout
        if rollout is None or (running or {}).get(listener.name) == rollout.identity(listener.name):
            continue
        if (problem := schedule_problem(rollout, now)) is not None:
            problems.append(f"{source}: listeners[{i}].rollout.started_at: {problem}")
    return problems


def format_seconds(seconds: float) -> str:
    """3d4h, 2h5m, 10m, 90s: at most the two largest units."""
    rest = max(0, round(seconds))
    parts: list[tuple[int, str]] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n or parts:
            parts.append((n, unit))
    return "".join(f"{n}{unit}" for n, unit in parts[:2] if n) or "0s"


class Rollout:
    """One listener's rollout: its state and the share it gives B.

    The state is what the config file says (paused_at, aborted_at, completed) unless this
    replica decided more: its own judgement aborted it, the admin API paused or aborted it
    on this replica, or its schedule ran out."""

    def __init__(self, config: RolloutConfig, identity: str, first_seen: float) -> None:
        self.config = config
        self.identity = identity
        self.started_at = config.started_at.timestamp() if config.started_at else first_seen
        self.local_abort: str | None = None  # why this replica aborted it
        self.local_paused_s = 0.0  # paused through the admin API, before `local_paused_since`
        self.local_paused_since: float | None = None
        self.done = False  # this replica saw the schedule run out
        # With a fleet judge, `to` gets nothing until its first answer (or its timeout): a
        # replica started after another aborted must not send anything to `to`.
        self.awaiting_fleet = config.abort.prometheus is not None
        self.window: deque[Sample] = deque()
        # What the balancer follows now (the listener applies the schedule on its ticks).
        self.applied_step = 0
        self.applied_share = 0
        self.pair_weight = 0  # weight(from) + weight(to) as configured: what the pair splits
        self.pair_part = 1.0  # their part of the listener's configured weight
        # The time line this replica saw, for the status page's chart (see observe): when
        # each step began, the pauses (until None: still paused), and when it ended.
        self.step_starts: deque[tuple[float, int]] = deque(maxlen=TIMELINE_ENTRIES)
        self.pauses: deque[tuple[float, float | None]] = deque(maxlen=TIMELINE_ENTRIES)
        self.ended_at: float | None = None

    def update(self, config: RolloutConfig) -> None:
        """The same rollout (same identity) with other decisions or thresholds from a
        reload. A pause in the file ends this replica's own pause at its instant, so that
        no time is counted twice."""
        self.config = config
        paused_at = _ts(config.paused_at)
        if paused_at is not None and self.local_paused_since is not None:
            self.local_paused_s += max(0.0, paused_at - self.local_paused_since)
            self.local_paused_since = None

    @property
    def state(self) -> str:
        if self.config.aborted_at is not None or self.local_abort is not None:
            return ABORTED
        if self.done or self.config.completed:
            return COMPLETED
        if self.config.paused_at is not None or self.local_paused_since is not None:
            return PAUSED
        return RUNNING

    @property
    def reason(self) -> str:
        if self.config.aborted_at is not None:
            return self.config.abort_reason or (
                f"aborted in the config file at {self.config.aborted_at.isoformat()}"
            )
        return self.local_abort or ""

    def elapsed(self, now: float) -> float:
        config = self.config
        elapsed = elapsed_at(self.started_at, config.paused_for, _ts(config.paused_at), now)
        local = self.local_paused_s
        if self.local_paused_since is not None:
            local += max(0.0, now - self.local_paused_since)
        return max(0.0, elapsed - local)

    def step(self, now: float) -> int:
        return step_at(self.config.steps, self.config.step_duration, self.elapsed(now))

    def share(self, now: float) -> int:
        """B's share of the pair's new connections in percent."""
        state = self.state
        if state == ABORTED:
            return 0
        if state == COMPLETED:
            return 100
        if self.awaiting_fleet:
            return 0
        index = self.step(now)
        return 100 if index >= len(self.config.steps) else self.config.steps[index]

    def next_change(self, now: float) -> float | None:
        """Seconds until the next step boundary (None when nothing is scheduled)."""
        if self.state != RUNNING:
            return None
        elapsed = self.elapsed(now)
        return (self.step(now) + 1) * self.config.step_duration - elapsed

    def advance(self, now: float, sample: Sample, b_up: bool, judge: bool = True) -> str | None:
        """Move the state on; returns an event to log ('completed', 'aborted: ...').
        `judge`: abort on this replica's own failure ratio (off while a fleet judge
        answers); B unhealthy here aborts either way."""
        if self.state not in (RUNNING, PAUSED):
            return None
        abort = self.config.abort
        while self.window and self.window[0].at < now - abort.window:
            self.window.popleft()
        reason = None
        if judge:
            reason = abort_reason(self.window, sample, abort.max_failure_ratio, abort.min_attempts)
        self.window.append(sample)
        if reason is None and abort.on_unhealthy and not b_up:
            reason = "the new backend is unhealthy"
        if reason is not None:
            self.local_abort = reason
            return f"aborted: {reason}"
        if self.state == RUNNING and self.step(now) >= len(self.config.steps):
            self.done = True
            return "completed"
        return None

    def pause(self, now: float) -> bool:
        if self.state != RUNNING:
            return False
        self.local_paused_since = now
        return True

    def resume(self, now: float) -> bool:
        """Ends this replica's own pause; a pause in the file ends by editing the file."""
        if self.state != PAUSED or self.local_paused_since is None:
            return False
        self.local_paused_s += now - self.local_paused_since
        self.local_paused_since = None
        return True

    def abort(self, reason: str) -> bool:
        if self.state in (COMPLETED, ABORTED):
            return False
        self.local_abort = reason
        return True

    def observe(self, now: float) -> None:
        """Put on the time line what changed since the last call (the listener calls it on
        every tick and decision). A step's start is placed where its schedule put it, not
        at the tick that saw it."""
        state = self.state
        if state in (COMPLETED, ABORTED):
            if self.ended_at is None:
                self.ended_at = now
                if state == COMPLETED and self.done:  # when the last step's time ran out
                    count = len(self.config.steps)
                    length = count * self.config.step_duration
                    self.ended_at = now - max(0.0, self.elapsed(now) - length)
                    if not self.step_starts or self.step_starts[-1][1] < count:
                        self.step_starts.append((self.ended_at, count))
            if self.pauses and self.pauses[-1][1] is None:
                self.pauses[-1] = (self.pauses[-1][0], self.ended_at)
            return
        step = self.step(now)
        if not self.step_starts or self.step_starts[-1][1] != step:
            at = now - max(0.0, self.elapsed(now) - step * self.config.step_duration)
            if self.step_starts:
                at = max(at, self.step_starts[-1][0])
            self.step_starts.append((at, step))
        open_pause = bool(self.pauses) and self.pauses[-1][1] is None
        if state == PAUSED and not open_pause:
            paused_at = _ts(self.config.paused_at)
            since = paused_at if paused_at is not None else self.local_paused_since
            self.pauses.append((min(now, since if since is not None else now), None))
        elif state != PAUSED and open_pause:
            self.pauses[-1] = (self.pauses[-1][0], now)

    def _share_of(self, index: int) -> int:
        return self.config.steps[index] if index < len(self.config.steps) else 100

    def as_dict(self, now: float) -> dict[str, object]:
        config = self.config
        return {
            "id": self.identity,
            "from": config.from_,
            "to": config.to,
            "state": self.state,
            "step": min(self.applied_step, len(config.steps) - 1) + 1,
            "steps": list(config.steps),
            "share": self.applied_share,
            "started_at": self.started_at,
            "paused_at": _ts(config.paused_at),
            "paused_for_s": config.paused_for,
            "aborted_at": _ts(config.aborted_at),
            "next_step_in_s": self.next_change(now),
            # The same instant on every replica that follows the same file.
            "next_step_at": None if (change := self.next_change(now)) is None else now + change,
            "awaiting_prometheus": self.awaiting_fleet,
            # The time line, for the status page's chart.
            "step_starts": [
                {"at": at, "step": k + 1, "share": self._share_of(k)} for at, k in self.step_starts
            ],
            "pauses": [{"from": start, "until": stop} for start, stop in self.pauses],
            "ended_at": self.ended_at,
            "pair_part": self.pair_part,
            "reason": self.reason,
        }
