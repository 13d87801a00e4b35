"""Progressive rollout over real connections: steps, completion, abort, control, reload."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from tcpproxy.pool import ROLLOUT_TICK_MAX_S
from tcpproxy.proxy import Proxy
from tests.harness import (
    Backends,
    Client,
    LoopThread,
    RunningProxy,
    config_yaml,
    free_port,
    greetings,
    listener_yaml,
    move_wall_clock,
    sleep_until,
    wait_until,
)
from tests.integration import admin_http
from tests.integration.admin_http import Admin

admins = pytest.fixture(admin_http.admins)
Start = Callable[[str], RunningProxy]


def rollout_yaml(
    port: int, backends: tuple[str, str], steps: str, step_duration: str, *, extra: str = ""
) -> str:
    """One listener with v1 and v2, and a rollout from v1 to v2; `extra` goes in the
    rollout block."""
    v1, v2 = backends
    text = listener_yaml("app", port, {"v1": (v1, 1), "v2": (v2, 0)})
    block = f"from: v1\nto: v2\nsteps: {steps}\nstep_duration: {step_duration}\n{extra}"
    return config_yaml(
        text + "    rollout:\n" + "".join(f"      {line}\n" for line in block.splitlines())
    )


def rollout_state(running: RunningProxy) -> dict[str, object]:
    def read(proxy: Proxy) -> dict[str, object]:
        rollout = proxy.listeners["app"].rollout
        assert rollout is not None
        return rollout.as_dict(time.time())  # the module's `time`: a moved clock if moved

    return running.state(read)


def effective_weights(running: RunningProxy) -> dict[str, int]:
    """The weights the listener's balancer follows now, by backend."""

    def read(proxy: Proxy) -> dict[str, int]:
        listener = proxy.listeners["app"]
        return {b.name: listener.effective_weight(b) for b in listener.all_backends()}

    return running.state(read)


def exported_rollout_weights(running: RunningProxy) -> dict[str, float | None]:
    return {
        name: running.metric("tcpproxy_rollout_weight", listener="app", backend=name)
        for name in ("v1", "v2")
    }


def shares(weights: Mapping[str, float | None]) -> dict[str, float]:
    """Each weight's part of their sum: the balancer's weights are reduced, the exported
    ones on the configured scale, and the shares are what both must agree on."""
    total = sum(w or 0 for w in weights.values())
    return {name: round((w or 0) / total, 9) for name, w in weights.items()}


def after_a_tick(running: RunningProxy) -> None:
    """Return once a rollout tick has run after this call began (they run at least every
    ROLLOUT_TICK_MAX_S, by the proxy's loop clock)."""

    async def barrier() -> None:
        await sleep_until(asyncio.get_running_loop().time() + ROLLOUT_TICK_MAX_S + 0.05)

    running.thread.run(barrier())


def test_steps_move_the_share_then_complete_at_100(
    backends: Backends, start_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hour-long steps on a clock the test moves: a step cannot end while it is being counted,
    # however slowly the counting goes.
    clock = move_wall_clock(monkeypatch)
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(rollout_yaml(port, (v1, v2), "[25, 50, 75]", "1h"))
    observed = {}
    for step, share in ((1, 25), (2, 50), (3, 75)):
        clock.offset_s = (step - 1) * 3600 + 60  # a minute into the step
        wait_until(
            partial(lambda want: rollout_state(running)["step"] == want, step), what=f"step {step}"
        )
        # 8 new connections: exactly share% reach v2 (the balancer's window is 4 here).
        seen = greetings(port, 8)
        assert rollout_state(running)["step"] == step, "the step changed while counting"
        observed[share] = seen["v2"] / 8
        assert shares(exported_rollout_weights(running)) == shares(effective_weights(running))
    assert observed == {25: 0.25, 50: 0.5, 75: 0.75}
    assert running.metric("tcpproxy_rollout_share_percent", listener="app", backend="v2") == 75
    assert running.metric("tcpproxy_rollout_step", listener="app") == 3
    clock.offset_s = 3 * 3600 + 60
    wait_until(lambda: rollout_state(running)["state"] == "completed", what="completed")
    assert running.metric("tcpproxy_rollout_state", listener="app", state="completed") == 1
    assert greetings(port, 8) == {"v2": 8}
    assert exported_rollout_weights(running) == {"v1": 0, "v2": 1}  # v1's weight 1, all to v2
    assert effective_weights(running) == {"v1": 0, "v2": 1}


def test_failures_in_the_new_backend_abort_and_leave_its_connections(
    backends: Backends, start_proxy: Start
) -> None:
    v1 = backends.start("v1")
    v2_port = free_port()
    v2 = backends.start("v2", port=v2_port)
    port = free_port()
    abort = "abort:\n  max_failure_ratio: 0.3\n  min_attempts: 3\n  window: 30s\n"
    running = start_proxy(rollout_yaml(port, (v1, v2), "[50, 100]", "60s", extra=abort))
    pinned = [Client(port) for _ in range(4)]
    on_v2 = [c for c in pinned if c.greeting() == "v2"]
    assert len(on_v2) == 2
    backends.stop("v2")  # v2 now refuses new connections; its open ones live on

    def aborted_after_more_failures() -> bool:
        greetings(port, 2)  # one of them tries v2 first, and fails over to v1
        return rollout_state(running)["state"] == "aborted"

    wait_until(aborted_after_more_failures, what="the rollout aborted")
    state = rollout_state(running)
    assert state["state"] == "aborted"
    assert state["share"] == 0
    assert "failed" in str(state["reason"]) or "unhealthy" in str(state["reason"])
    assert greetings(port, 6) == {"v1": 6}
    for c in on_v2:
        assert c.echo(b"still on v2\n") == b"still on v2\n"
    for c in pinned:
        c.close()


def test_pause_resume_abort_through_admin_and_cli(
    backends: Backends,
    start_proxy: Start,
    admins: Callable[[Proxy], Admin],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = move_wall_clock(monkeypatch)
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(rollout_yaml(port, (v1, v2), "[10, 20]", "1h"))
    admin = admins(running.proxy)
    assert admin.post("/rollout/app/pause").status == 200
    assert admin.post("/rollout/app/pause").status == 409  # already paused
    # Far past the first step, and a tick later: a paused rollout stays where it is.
    clock.offset_s = 2 * 3600
    after_a_tick(running)
    assert rollout_state(running)["step"] == 1
    assert greetings(port, 10) == {"v1": 9, "v2": 1}
    assert admin.status()["listeners"][0]["rollout"]["state"] == "paused"
    cli = [sys.executable, "-m", "tcpproxy", "rollout"]
    address = admin.url.removeprefix("http://")
    out = subprocess.run(
        [*cli, "status", "--admin", address], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("app: v1 -> v2 paused, step 1/2, 10% to v2")
    subprocess.run([*cli, "resume", "--admin", address], capture_output=True, check=True)
    assert rollout_state(running)["state"] == "running"
    done = subprocess.run(
        [*cli, "abort", "--admin", address, "--listener", "app"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "aborted" in done.stdout
    assert greetings(port, 4) == {"v1": 4}
    again = subprocess.run(
        [*cli, "resume", "--admin", address], capture_output=True, text=True, check=False
    )
    assert again.returncode == 1
    assert admin.post("/rollout/nope/pause").status == 404


def test_reload_keeps_an_unchanged_rollout_and_restarts_a_changed_one(
    backends: Backends, start_proxy: Start
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(rollout_yaml(port, (v1, v2), "[10, 20]", "1h"))
    assert running.state(lambda p: p.listeners["app"].control_rollout("pause", "a test"))
    # Another option changes; the rollout block does not: still paused, same start.
    started = rollout_state(running)["started_at"]
    running.write_config(
        rollout_yaml(port, (v1, v2), "[10, 20]", "1h").replace(
            "    rollout:", "    idle_timeout: 2h\n    rollout:"
        )
    )
    assert running.reload().result == "success"
    assert rollout_state(running)["state"] == "paused"
    assert rollout_state(running)["started_at"] == started
    # A changed rollout is a new one.
    running.write_config(rollout_yaml(port, (v1, v2), "[30, 60]", "1h"))
    assert running.reload().result == "success"
    assert rollout_state(running)["state"] == "running"
    assert rollout_state(running)["share"] == 30


def test_restart_with_started_at_resumes_at_the_right_step(
    backends: Backends, loop_thread: LoopThread, tmp_path: Path
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    # Two and a half hour-long steps ago: in the middle of the third, whatever the start-up
    # below takes.
    begun = datetime.fromtimestamp(time.time() - 2.5 * 3600, UTC).isoformat()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(
        rollout_yaml(port, (v1, v2), "[10, 50, 90]", "1h", extra=f'started_at: "{begun}"\n')
    )
    running = RunningProxy(loop_thread, path)  # a fresh proxy: as after a restart
    try:
        state = rollout_state(running)
        assert state["step"] == 3
        assert state["share"] == 90
    finally:
        running.shutdown()


def test_a_rollout_beside_a_third_backend_moves_only_the_pairs_share(
    backends: Backends, start_proxy: Start
) -> None:
    """v1 80 and v2 20; a rollout from v1 to v3 (weight 0) at 50%: v2 keeps its 20%, v1 and
    v3 split v1's 80%. After an abort v1 has all 80% back; v2 never moves."""
    v1, v2, v3 = backends.start("v1"), backends.start("v2"), backends.start("v3")
    port = free_port()
    text = listener_yaml("app", port, {"v1": (v1, 80), "v2": (v2, 20), "v3": (v3, 0)})
    block = "    rollout:\n      from: v1\n      to: v3\n      steps: [50, 100]\n"
    running = start_proxy(config_yaml(text + block + "      step_duration: 1h\n"))
    # The balancer's exact cycle is 5 here (v1 2, v2 1, v3 2): 10 connections, exact shares.
    assert greetings(port, 10) == {"v1": 4, "v2": 2, "v3": 4}
    assert running.state(lambda p: p.listeners["app"].control_rollout("abort", "a test"))
    assert greetings(port, 10) == {"v1": 8, "v2": 2}


def test_decisions_written_in_the_file_steer_the_rollout_and_outlive_a_restart(
    backends: Backends,
    loop_thread: LoopThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = move_wall_clock(monkeypatch)
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    begun = datetime.fromtimestamp(time.time() - 60, UTC).isoformat()
    base = rollout_yaml(port, (v1, v2), "[10, 50]", "1h", extra=f'started_at: "{begun}"\n')
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(base)
    running = RunningProxy(loop_thread, path)
    cli = [sys.executable, "-m", "tcpproxy", "rollout"]
    try:
        out = subprocess.run(
            [*cli, "pause", "--config", str(path)], capture_output=True, text=True, check=True
        )
        assert "paused at" in out.stdout
        assert path.read_text().startswith(base.rstrip("\n"))  # only a key added at the end
        assert running.reload().result == "success"
        clock.offset_s = 3 * 3600  # long past the first step: held at the pause's instant
        after_a_tick(running)
        assert rollout_state(running)["state"] == "paused"
        assert rollout_state(running)["step"] == 1
        out = subprocess.run(
            [*cli, "abort", "--config", str(path), "--reason", "v2 loses carts"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert running.reload().result == "success"
        assert rollout_state(running)["state"] == "aborted"
        assert rollout_state(running)["reason"] == "v2 loses carts"
        assert greetings(port, 4) == {"v1": 4}
    finally:
        running.shutdown()
    restarted = RunningProxy(loop_thread, path)  # a new process reads the same file
    try:
        assert rollout_state(restarted)["state"] == "aborted"
        assert greetings(port, 4) == {"v1": 4}
    finally:
        restarted.shutdown()


def test_a_schedule_that_ended_before_it_was_seen_is_refused_and_the_old_config_serves(
    backends: Backends, start_proxy: Start, tmp_path: Path
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(config_yaml(listener_yaml("app", port, {"v1": (v1, 1), "v2": (v2, 0)})))
    last_week = datetime.fromtimestamp(time.time() - 7 * 86400, UTC).isoformat()
    stale = rollout_yaml(
        port, (v1, v2), "[5, 25, 50, 100]", "10m", extra=f'started_at: "{last_week}"\n'
    )
    running.write_config(stale)
    result = running.reload()
    assert result.result == "failure"
    (problem,) = result.problems
    assert "listeners[0].rollout.started_at: the whole schedule (4 steps of 10m) ended" in problem
    assert greetings(port, 4) == {"v1": 4}  # the old config serves
    path = tmp_path / "stale.yaml"
    path.write_text(stale)
    check = subprocess.run(
        [sys.executable, "-m", "tcpproxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1
    assert check.stderr.startswith(f"{path}: listeners[0].rollout.started_at: the whole")
    # Said to be completed: accepted, and all of the pair's share goes to v2.
    running.write_config(stale.replace("    rollout:\n", "    rollout:\n      completed: true\n"))
    assert running.reload().result == "success"
    assert rollout_state(running)["state"] == "completed"
    assert greetings(port, 4) == {"v2": 4}
