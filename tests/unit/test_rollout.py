"""Rollout schedule and abort decision: pure logic, property-tested."""

from __future__ import annotations

import math
from collections import deque
from datetime import UTC, datetime, timedelta
from fractions import Fraction

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
    elapsed_at,
    format_seconds,
    pair_weights,
    schedule_problem,
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


weight_maps = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 1000), min_size=2
)


@given(weights=weight_maps, share=st.integers(0, 100), data=st.data())
def test_pair_weights_split_the_pairs_share_and_keep_the_bystanders(
    weights: dict[str, int], share: int, data: st.DataObject
) -> None:
    """Shares as exact fractions: the pair keeps what it held together, split share:100,
    and every other backend keeps its configured share."""
    from_, to = data.draw(
        st.lists(st.sampled_from(sorted(weights)), min_size=2, max_size=2, unique=True)
    )
    total = sum(weights.values())
    out = pair_weights(weights, from_, to, share)
    out_total = sum(out.values())
    if total == 0:
        assert out_total == 0
        return
    pair = weights[from_] + weights[to]
    for name, weight in weights.items():
        if name == to:
            expected = Fraction(pair * share, total * 100)
        elif name == from_:
            expected = Fraction(pair * (100 - share), total * 100)
        else:
            expected = Fraction(weight, total)
        assert Fraction(out[name], out_total) == expected
    assert math.gcd(*out.values()) == 1


def test_pair_weights_beside_a_third_backend() -> None:
    """v1 80 and v2 20, a rollout from v1 to v3 (weight 0): v2 keeps its 20%; v1 and v3
    split the 80% v1 held. After an abort (share 0) v1 has its 80% back."""
    weights = {"v1": 80, "v2": 20, "v3": 0}
    assert pair_weights(weights, "v1", "v3", 50) == {"v1": 2, "v2": 1, "v3": 2}
    assert pair_weights(weights, "v1", "v3", 0) == {"v1": 4, "v2": 1, "v3": 0}
    assert pair_weights(weights, "v1", "v3", 100) == {"v1": 0, "v2": 1, "v3": 4}


@given(
    pause_at=st.floats(min_value=0, max_value=100), pause_for=st.floats(min_value=0, max_value=1000)
)
def test_paused_time_does_not_count(pause_at: float, pause_for: float) -> None:
    rollout = Rollout(config(duration=60), "id", 1000.0)
    rollout.pause(1000.0 + pause_at)
    assert rollout.elapsed(1000.0 + pause_at + pause_for) == rollout.elapsed(1000.0 + pause_at)
    rollout.resume(1000.0 + pause_at + pause_for)
    assert abs(rollout.elapsed(1000.0 + pause_at + pause_for + 5) - (pause_at + 5)) < 1e-6


def test_restart_with_started_at_lands_on_the_same_step() -> None:
    started = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    cfg = config(duration=60, started_at=started.isoformat())
    now = started.timestamp() + 150  # 2.5 steps in
    first = Rollout(cfg, "id", now - 150)
    restarted = Rollout(cfg, "id", now)  # a new process: the config's time wins
    assert first.step(now) == restarted.step(now) == 2
    assert restarted.share(now) == 100


def test_completion_and_abort_decisions() -> None:
    rollout = Rollout(config(steps=(50,), duration=10), "id", 0.0)
    assert rollout.advance(5.0, Sample(5.0, 10, 0), b_up=True) is None
    assert rollout.state == RUNNING
    assert rollout.advance(10.5, Sample(10.5, 20, 0), b_up=True) == "completed"
    assert rollout.state == COMPLETED
    assert rollout.share(11.0) == 100

    failing = Rollout(config(duration=10), "id", 0.0)
    failing.advance(1.0, Sample(1.0, 0, 0), b_up=True)
    event = failing.advance(2.0, Sample(2.0, 10, 5), b_up=True)
    assert event is not None
    assert event.startswith("aborted")
    assert failing.state == ABORTED
    assert failing.share(3.0) == 0

    unhealthy = Rollout(config(duration=10), "id", 0.0)
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


instants = st.floats(min_value=1.7e9, max_value=1.9e9)


@given(
    started=instants,
    paused_for=st.floats(0, 1e5),
    pause=st.none() | st.floats(0, 1e5),
    after=st.lists(st.floats(0, 1e6), min_size=1, max_size=5),
)
def test_a_paused_schedule_holds_still_and_never_goes_back(
    started: float, paused_for: float, pause: float | None, after: list[float]
) -> None:
    """Pure in the file's fields and the clock: held at the pause's instant however late
    a replica reads it, and never backwards."""
    paused_at = None if pause is None else started + pause
    times = sorted(started + t for t in after)
    elapsed = [elapsed_at(started, paused_for, paused_at, t) for t in times]
    assert elapsed == sorted(elapsed)
    assert all(e >= 0 for e in elapsed)
    if paused_at is not None:
        frozen = elapsed_at(started, paused_for, paused_at, paused_at)
        assert all(e == frozen for e, t in zip(elapsed, times, strict=True) if t >= paused_at)


@given(
    pauses=st.lists(st.tuples(st.floats(1, 1000), st.floats(1, 1000)), max_size=4),
    tail=st.floats(0, 1000),
)
def test_pause_and_resume_in_the_file_move_the_schedule_by_the_paused_time(
    pauses: list[tuple[float, float]], tail: float
) -> None:
    """The CLI records a pause as its instant and a resume as paused_for += the pause's
    length: the running time is then the wall time minus every pause."""
    started, now, paused_for, running = 1.8e9, 1.8e9, 0.0, 0.0
    for run, held in pauses:
        now += run
        running += run
        assert math.isclose(elapsed_at(started, paused_for, now, now + held), running, abs_tol=1e-5)
        now += held
        paused_for += held
    assert math.isclose(
        elapsed_at(started, paused_for, None, now + tail), running + tail, abs_tol=1e-5
    )


@given(
    steps=step_lists,
    duration=st.floats(min_value=1, max_value=3600),
    # Away from the end itself, where float rounding of epoch seconds decides.
    offset=st.floats(-1e6, -0.01) | st.floats(0.01, 1e6),
    completed=st.booleans(),
    aborted=st.booleans(),
)
def test_a_schedule_wholly_in_the_past_is_refused_unless_said_so(
    steps: tuple[int, ...], duration: float, offset: float, completed: bool, aborted: bool
) -> None:
    start = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    extra: dict[str, object] = {"started_at": start.isoformat(), "completed": completed}
    if aborted:
        extra["aborted_at"] = start.isoformat()
    cfg = config(steps=steps, duration=duration, **extra)
    now = start.timestamp() + len(steps) * duration + offset
    problem = schedule_problem(cfg, now)
    assert (problem is not None) == (offset >= 0 and not completed and not aborted)
    rollout = Rollout(cfg, "id", now)
    assert rollout.step(now) <= len(steps)
    assert 1 <= rollout.as_dict(now)["step"] <= len(steps)  # type: ignore[operator]


def test_the_readme_example_pasted_a_week_later_is_refused() -> None:
    start = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    cfg = config(steps=(5, 25, 50, 100), duration=600, started_at=start.isoformat())
    problem = schedule_problem(cfg, (start + timedelta(days=6, hours=3)).timestamp())
    assert problem is not None
    assert "ended 6d2h ago" in problem
    assert "'v2'" in problem


def test_decisions_in_the_file_set_the_state() -> None:
    start = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    t0 = start.timestamp()
    running = config(steps=(10, 50), duration=60, started_at=start.isoformat())
    rollout = Rollout(running, "id", t0)
    assert (rollout.state, rollout.share(t0 + 61)) == (RUNNING, 50)
    paused = config(
        steps=(10, 50),
        duration=60,
        started_at=start.isoformat(),
        paused_at=(start + timedelta(seconds=30)).isoformat(),
    )
    rollout.update(paused)
    assert (rollout.state, rollout.share(t0 + 500)) == (PAUSED, 10)
    resumed = config(steps=(10, 50), duration=60, started_at=start.isoformat(), paused_for="470s")
    rollout.update(resumed)
    assert rollout.state == RUNNING
    assert rollout.share(t0 + 529) == 10  # 59 s of running
    assert rollout.share(t0 + 531) == 50
    aborted = config(
        steps=(10, 50),
        duration=60,
        started_at=start.isoformat(),
        aborted_at=start.isoformat(),
        abort_reason="v2 corrupts carts",
    )
    rollout.update(aborted)
    assert (rollout.state, rollout.share(t0 + 600), rollout.reason) == (
        ABORTED,
        0,
        "v2 corrupts carts",
    )


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 5, 90, 600, 7500, 259207)] == [
        "0s",
        "5s",
        "1m30s",
        "10m",
        "2h5m",
        "3d",
    ]


@given(
    steps=step_lists,
    duration=st.integers(min_value=1, max_value=600),
    gaps=st.lists(st.integers(min_value=0, max_value=900), min_size=1, max_size=100),
)
def test_the_time_line_follows_the_schedule_through_pauses(
    steps: tuple[int, ...], duration: int, gaps: list[int]
) -> None:
    """Observed at every pause and resume: the time line's last step is the one in force,
    steps begin in time order, never after now, and never inside a pause."""
    rollout = Rollout(config(steps, duration), "id", 1000.0)
    now = 1000.0
    rollout.observe(now)
    for i, gap in enumerate(gaps):
        now += gap
        rollout.observe(now)  # a tick, before the decision
        if i % 2 == 0:
            rollout.pause(now)
        else:
            rollout.resume(now)
        rollout.observe(now)
        starts = list(rollout.step_starts)
        assert starts[-1][1] == min(rollout.step(now), len(steps))
        times = [at for at, _ in starts]
        assert times == sorted(times)
        assert all(at <= now for at in times)
        closed = [(a, b) for a, b in rollout.pauses if b is not None]
        assert not any(start < at < stop for at in times for start, stop in closed)
    listed = rollout.as_dict(now)["step_starts"]
    assert isinstance(listed, list)
    assert listed[-1]["step"] == starts[-1][1] + 1


def test_an_ended_rollout_has_no_later_steps() -> None:
    rollout = Rollout(config((10, 50), 60), "id", 0.0)
    rollout.observe(0.0)
    rollout.observe(61.0)
    assert rollout.abort("by hand")
    rollout.observe(70.0)
    assert rollout.ended_at == 70.0
    rollout.observe(500.0)
    assert [k for _, k in rollout.step_starts] == [0, 1]
    completed = Rollout(config((10, 50), 60), "id", 0.0)
    completed.observe(0.0)
    completed.observe(65.0)
    assert completed.advance(130.0, Sample(130.0, 0, 0), True) == "completed"
    completed.observe(130.0)
    assert completed.ended_at == 120.0  # when the last step's time ran out, not the tick
    assert list(completed.step_starts) == [(0.0, 0), (60.0, 1), (120.0, 2)]
