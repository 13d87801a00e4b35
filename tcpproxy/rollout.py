"""Progressive rollout: move new connections from backend A to B in timed steps, abort on
failures. Pure: the caller passes the time and the counters; no I/O, no asyncio.

The schedule is a function of elapsed running time, so a proxy restarted with the same
`started_at` lands on the same step instead of starting over or jumping to 100%.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tcpproxy.config import RolloutConfig

RUNNING = "running"
PAUSED = "paused"
COMPLETED = "completed"
ABORTED = "aborted"
STATES = (RUNNING, PAUSED, COMPLETED, ABORTED)
# Pauses remembered for placing steps on the time line; past this, the oldest is folded into
# a checkpoint (the steps that began before it are kept as they are).
MAX_PAUSES = 32


def step_at(steps: tuple[int, ...], step_duration_s: float, elapsed_s: float) -> int:
    """Index of the step in force after `elapsed_s` of running; len(steps) once done."""
    if elapsed_s <= 0:
        return 0
    return min(int(elapsed_s // step_duration_s), len(steps))


def split_weights(share: int) -> tuple[int, int]:
    """Weights (A, B) for B's share in percent, reduced so that the balancer's exact window
    (sum of weights) is as short as possible: 25% -> (3, 1), a 1-in-4 pattern."""
    a, b = 100 - share, share
    g = math.gcd(a, b) or 1
    return a // g, b // g


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


class Rollout:
    """One listener's rollout: its state and the weights it imposes on A and B."""

    def __init__(self, config: RolloutConfig, started_at: float) -> None:
        self.config = config
        self.started_at = config.started_at.timestamp() if config.started_at else started_at
        self.state = RUNNING
        self.reason = ""
        self.paused_s = 0.0  # running time lost to pauses, before `paused_since`
        self.paused_since: float | None = None
        self.window: deque[Sample] = deque()
        # For the time line: the pauses that ended, the point from which step starts are
        # worked out (wall time, running time then, the next step to begin), the steps that
        # began before it, and when the rollout ended.
        self.pauses: deque[tuple[float, float]] = deque()
        self._checkpoint = (self.started_at, 0.0, 0)
        self._folded: list[tuple[float, int]] = []
        self.ended_at: float | None = None
        # What the balancer follows now (the listener applies the schedule on its ticks).
        self.applied_step = 0
        self.applied_share = 0

    @property
    def key(self) -> RolloutConfig:
        return self.config

    def elapsed(self, now: float) -> float:
        paused = self.paused_s + (now - self.paused_since if self.paused_since else 0.0)
        return max(0.0, now - self.started_at - paused)

    def step(self, now: float) -> int:
        return step_at(self.config.steps, self.config.step_duration, self.elapsed(now))

    def share(self, now: float) -> int:
        """B's share of new connections in percent."""
        if self.state == ABORTED:
            return 0
        if self.state == COMPLETED:
            return 100
        index = self.step(now)
        return 100 if index >= len(self.config.steps) else self.config.steps[index]

    def next_change(self, now: float) -> float | None:
        """Seconds until the next step boundary (None when nothing is scheduled)."""
        if self.state != RUNNING:
            return None
        elapsed = self.elapsed(now)
        return (self.step(now) + 1) * self.config.step_duration - elapsed

    def advance(self, now: float, sample: Sample, b_up: bool) -> str | None:
        """Move the state on; returns an event to log ('completed', 'aborted: ...')."""
        if self.state not in (RUNNING, PAUSED):
            if self.ended_at is None:
                self.ended_at = now  # aborted by an operator: the first tick after it
            return None
        abort = self.config.abort
        window_s = abort.window
        while self.window and self.window[0].at < now - window_s:
            self.window.popleft()
        reason = abort_reason(self.window, sample, abort.max_failure_ratio, abort.min_attempts)
        self.window.append(sample)
        if reason is None and abort.on_unhealthy and not b_up:
            reason = "the new backend is unhealthy"
        if reason is not None:
            self.state = ABORTED
            self.reason = reason
            self.ended_at = now
            return f"aborted: {reason}"
        if self.state == RUNNING and self.step(now) >= len(self.config.steps):
            self.state = COMPLETED
            # When the last step's time ran out, not this (later) tick.
            starts = self.step_starts(now)
            done = bool(starts) and starts[-1][1] == len(self.config.steps)
            self.ended_at = starts[-1][0] if done else now
            return "completed"
        return None

    def pause(self, now: float) -> bool:
        if self.state != RUNNING:
            return False
        self.state = PAUSED
        self.paused_since = now
        return True

    def resume(self, now: float) -> bool:
        if self.state != PAUSED or self.paused_since is None:
            return False
        self.paused_s += now - self.paused_since
        self.pauses.append((self.paused_since, now))
        self.paused_since = None
        if len(self.pauses) > MAX_PAUSES:
            start, end = self.pauses[0]
            self._folded += self._walk(end)
            self.pauses.popleft()
            at, elapsed, k = self._checkpoint
            next_k = self._folded[-1][1] + 1 if self._folded else k
            self._checkpoint = (end, elapsed + max(0.0, start - at), next_k)
        self.state = RUNNING
        return True

    def abort(self, reason: str, now: float | None = None) -> bool:
        if self.state in (COMPLETED, ABORTED):
            return False
        self.state = ABORTED
        self.reason = reason
        self.ended_at = now
        return True

    def step_starts(self, now: float) -> list[tuple[float, int]]:
        """(wall time, step index) of each step that has begun by `now` (index len(steps):
        the schedule's end, 100%), pauses accounted for; none after the rollout ended."""
        return [*self._folded, *self._walk(now)]

    def _walk(self, now: float) -> list[tuple[float, int]]:
        """The step starts from the checkpoint on."""
        at, elapsed, k = self._checkpoint
        duration, count = self.config.step_duration, len(self.config.steps)
        end = now if self.ended_at is None else min(now, self.ended_at)
        out: list[tuple[float, int]] = []
        spans = [*self.pauses]
        if self.paused_since is not None:
            spans.append((self.paused_since, now))
        for start, stop in [*spans, (end, end)]:
            run_until = min(start, end)
            while k <= count and at + (k * duration - elapsed) <= run_until:
                out.append((at + k * duration - elapsed, k))
                k += 1
            elapsed += max(0.0, run_until - at)
            at = max(at, stop)
            if at >= end:
                break
        return out

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "from": self.config.from_,
            "to": self.config.to,
            "state": self.state,
            "step": min(self.applied_step, len(self.config.steps) - 1) + 1,
            "steps": list(self.config.steps),
            "share": self.applied_share,
            "started_at": self.started_at,
            "next_step_in_s": self.next_change(now),
            "reason": self.reason,
            # The time line, for the status page's chart.
            "step_starts": [
                {"at": at, "step": k + 1, "share": self._share_of(k)}
                for at, k in self.step_starts(now)
            ],
            "pauses": [
                {"from": start, "until": stop}
                for start, stop in [
                    *self.pauses,
                    *([(self.paused_since, None)] if self.paused_since is not None else []),
                ]
            ],
            "ended_at": self.ended_at,
        }

    def _share_of(self, index: int) -> int:
        return self.config.steps[index] if index < len(self.config.steps) else 100
