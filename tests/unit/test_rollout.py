"""Rollout schedule and abort decision: pure logic, property-tested."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.config import RolloutConfig
from tcpproxy.rollout import (
    ABORTED,
    COMPLETED,
    PAUSED,
    RUNNING,
    Rollout,
    Sample,
    abort_reason,
    split_weights,
    step_at,
)

step_lists = st.lists(
    st.integers(min_value=1, max_value=100), min_size=1, max_size=8, unique=True
).map(lambda xs: tuple(sorted(xs)))


def config(
    steps: tuple[int, ...] = (10, 50, 100), duration: float = 60, **extra: object
) -> RolloutConfig:
    return RolloutConfig.model_validate(
        {"from": "v1", "to": "v2", "steps": list(steps), "step_duration": duration, **extra}
    )


@given(steps=step_lists, duration=st.floats(min_value=0.1, max_value=3600), data=st.data())
def test_each_step_holds_for_its_duration(
    steps: tuple[int, ...], duration: float, data: st.DataObject
) -> None:
    k = data.draw(st.integers(min_value=0, max_value=len(steps) - 1))
    inside = data.draw(st.floats(min_value=0.01, max_value=0.99))
    assert step_at(steps, duration, (k + inside) * duration) == k
    assert step_at(steps, duration, (len(steps) + inside) * duration) == len(steps)


@given(steps=step_lists, times=st.lists(st.floats(min_value=-10, max_value=1e5), min_size=2))
def test_steps_never_go_back(steps: tuple[int, ...], times: list[float]) -> None:
    indexes = [step_at(steps, 7.5, t) for t in sorted(times)]
    assert indexes == sorted(indexes)


@given(share=st.integers(min_value=0, max_value=100))
def test_split_weights_keep_the_share_exactly(share: int) -> None:
    a, b = split_weights(share)
    assert b * 100 == share * (a + b)
    assert a >= 0
    assert b >= 0


@given(
    pause_at=st.floats(min_value=0, max_value=100), pause_for=st.floats(min_value=0, max_value=1000)
)
def test_paused_time_does_not_count(pause_at: float, pause_for: float) -> None:
    rollout = Rollout(config(duration=60), started_at=1000.0)
    rollout.pause(1000.0 + pause_at)
    assert rollout.elapsed(1000.0 + pause_at + pause_for) == rollout.elapsed(1000.0 + pause_at)
    rollout.resume(1000.0 + pause_at + pause_for)
    assert abs(rollout.elapsed(1000.0 + pause_at + pause_for + 5) - (pause_at + 5)) < 1e-6


def test_restart_with_started_at_lands_on_the_same_step() -> None:
    started = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    cfg = config(duration=60, started_at=started.isoformat())
    now = started.timestamp() + 150  # 2.5 steps in
    first = Rollout(cfg, started_at=now - 150)
    restarted = Rollout(cfg, started_at=now)  # a new process: the config's time wins
    assert first.step(now) == restarted.step(now) == 2
    assert restarted.share(now) == 100


def test_completion_and_abort_decisions() -> None:
    rollout = Rollout(config(steps=(50,), duration=10), started_at=0.0)
    assert rollout.advance(5.0, Sample(5.0, 10, 0), b_up=True) is None
    assert rollout.state == RUNNING
    assert rollout.advance(10.5, Sample(10.5, 20, 0), b_up=True) == "completed"
    assert rollout.state == COMPLETED
    assert rollout.share(11.0) == 100

    failing = Rollout(config(duration=10), started_at=0.0)
    failing.advance(1.0, Sample(1.0, 0, 0), b_up=True)
    event = failing.advance(2.0, Sample(2.0, 10, 5), b_up=True)
    assert event is not None
    assert event.startswith("aborted")
    assert failing.state == ABORTED
    assert failing.share(3.0) == 0

    unhealthy = Rollout(config(duration=10), started_at=0.0)
    unhealthy.pause(1.0)
    assert unhealthy.state == PAUSED
    assert unhealthy.advance(2.0, Sample(2.0, 0, 0), b_up=False) == (
        "aborted: the new backend is unhealthy"
    )


@given(
    attempts=st.integers(min_value=0, max_value=1000),
    failures_part=st.floats(min_value=0, max_value=1),
    max_ratio=st.floats(min_value=0.01, max_value=1),
    min_attempts=st.integers(min_value=1, max_value=50),
)
def test_abort_only_past_both_thresholds(
    attempts: int, failures_part: float, max_ratio: float, min_attempts: int
) -> None:
    failures = int(attempts * failures_part)
    window = deque([Sample(0.0, 100, 7)])
    reason = abort_reason(
        window, Sample(1.0, 100 + attempts, 7 + failures), max_ratio, min_attempts
    )
    expected = attempts >= min_attempts and failures / attempts > max_ratio if attempts else False
    assert (reason is not None) == expected


@given(
    steps=step_lists,
    duration=st.integers(min_value=1, max_value=600),
    gaps=st.lists(st.integers(min_value=0, max_value=900), min_size=1, max_size=100),
)
def test_step_starts_follow_the_schedule_through_pauses(
    steps: tuple[int, ...], duration: int, gaps: list[int]
) -> None:
    """At every moment, the time line's last step is the one in force, steps begin in time
    order and never inside a pause, however many pauses (older ones folded away)."""
    rollout = Rollout(config(steps, duration), started_at=1000.0)
    now = 1000.0
    for i, gap in enumerate(gaps):
        now += gap
        if i % 2 == 0:
            rollout.pause(now)
        else:
            rollout.resume(now)
        starts = rollout.step_starts(now)
        assert starts, "the first step begins at the start"
        assert starts[-1][1] == min(rollout.step(now), len(steps))
        times = [at for at, _ in starts]
        assert times == sorted(times)
        assert all(at <= now for at in times)
        indexes = [k for _, k in starts]
        assert indexes == list(range(indexes[0], indexes[-1] + 1))
        for at in times:
            assert not any(start < at < stop for start, stop in rollout.pauses)
    listed = rollout.as_dict(now)["step_starts"]
    assert isinstance(listed, list)
    assert listed[-1]["step"] == starts[-1][1] + 1


def test_an_ended_rollout_has_no_later_steps() -> None:
    rollout = Rollout(config((10, 50), 60), started_at=0.0)
    assert rollout.abort("by hand", now=70.0)
    assert [k for _, k in rollout.step_starts(500.0)] == [0, 1]
    completed = Rollout(config((10, 50), 60), started_at=0.0)
    assert completed.advance(130.0, Sample(130.0, 0, 0), True) == "completed"
    assert completed.ended_at == 120.0
    assert completed.step_starts(900.0) == [(0.0, 0), (60.0, 1), (120.0, 2)]


def test_an_operators_abort_ends_the_time_line_at_the_next_tick() -> None:
    """The listener aborts without a time; its next tick (advance) supplies it."""
    rollout = Rollout(config((10, 50), 60), started_at=0.0)
    assert rollout.abort("aborted by an admin API request")
    assert rollout.ended_at is None
    assert rollout.advance(75.0, Sample(75.0, 0, 0), True) is None
    assert rollout.ended_at == 75.0
    assert [k for _, k in rollout.step_starts(900.0)] == [0, 1]
