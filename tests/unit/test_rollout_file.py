"""`tcpproxy rollout ... --config`: the edit keeps the user's file and records the decision."""

from __future__ import annotations

import difflib
import json
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpproxy.config import parse_config
from tcpproxy.rollout import elapsed_at
from tcpproxy.rollout_file import EditError, edit_file, edit_text

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FILE = """\
# Routes for the shop.   Comments, blank lines and quoting stay as written.
listeners:
  - name: shop        # the public port
    bind: "0.0.0.0:8008"

    backends:
      - {name: v1, address: "shop-v1:9000", weight: 80}   # stable
      - {name: v2, address: 'shop-v2:9000', weight: 20}
      - {name: v3, address: "shop-v3:9000", weight: 0}
    rollout:
      from: v1
      to: v3
      steps: [10, 50, 100]    # v3's share of v1's part
      step_duration: 10m
      started_at: "2026-12-01T12:00:00Z"
      abort:
        max_failure_ratio: 0.1
  - name: admin-db
    bind: "0.0.0.0:5432"
    backends:
      - {name: db, address: "db:5432"}
"""


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return (
        [line[2:] for line in diff if line.startswith("- ")],
        [line[2:] for line in diff if line.startswith("+ ")],
    )


def test_pause_adds_one_line_and_keeps_every_other_byte() -> None:
    after, edits = edit_text(FILE, "pause", None, START + timedelta(minutes=12))
    removed, added = changed_lines(FILE, after)
    assert removed == []
    assert added == ['      paused_at: "2026-12-01T12:12:00.000Z"']
    assert [e.listener for e in edits] == ["shop"]
    assert edits[0].summary.endswith("(step 2 of 3, 50%)")
    parse_config(after.encode(), "x.yaml")


@settings(max_examples=25)  # each example edits the file up to 8 times (ruamel is slow)
@given(
    pauses=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)), max_size=4),
)
def test_pause_and_resume_record_exactly_the_time_held(pauses: list[tuple[int, int]]) -> None:
    """Each resume adds the pause's length (to the millisecond) to paused_for, so the
    schedule's running time is the wall time minus every pause."""
    text, now, held = FILE.replace("step_duration: 10m", "step_duration: 1000h"), START, 0
    for run_ms, hold_ms in pauses:
        now += timedelta(milliseconds=run_ms)
        text, _ = edit_text(text, "pause", "shop", now)
        now += timedelta(milliseconds=hold_ms)
        text, _ = edit_text(text, "resume", "shop", now)
        held += hold_ms
    rollout = parse_config(text.encode(), "x.yaml").config.listeners[0].rollout
    assert rollout is not None
    assert round(rollout.paused_for * 1000) == held
    assert rollout.paused_at is None
    running = elapsed_at(START.timestamp(), rollout.paused_for, None, now.timestamp())
    assert abs(running * 1000 - (sum(r for r, _ in pauses))) < 1


def test_abort_records_when_and_why() -> None:
    after, _ = edit_text(FILE, "abort", "shop", START, reason='v3 said "no"')
    rollout = parse_config(after.encode(), "x.yaml").config.listeners[0].rollout
    assert rollout is not None
    assert rollout.aborted_at == START
    assert rollout.abort_reason == 'v3 said "no"'
    with pytest.raises(EditError, match="aborted already"):
        edit_text(after, "pause", None, START)


@pytest.mark.parametrize(
    ("text", "action", "listener", "message"),
    [
        (FILE, "resume", None, "not paused"),
        (FILE, "pause", "admin-db", "no rollout on listener 'admin-db'"),
        (FILE, "pause", "nope", "no rollout on listener 'nope'"),
        ("listeners: [\n", "pause", None, "invalid YAML"),
        ("{}\n", "pause", None, "no 'listeners' list"),
    ],
)
def test_what_cannot_be_done_says_why(
    text: str, action: str, listener: str | None, message: str
) -> None:
    with pytest.raises(EditError, match=message):
        edit_text(text, action, listener, START)


def test_a_schedule_that_ended_cannot_be_paused() -> None:
    with pytest.raises(EditError, match="schedule has ended"):
        edit_text(FILE, "pause", None, START + timedelta(hours=1))


def test_the_file_is_replaced_whole_and_the_kubectl_patch_carries_it(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(FILE)
    path.chmod(0o640)
    lines = edit_file(
        path,
        "pause",
        listener=None,
        reason=None,
        configmap="shop-routes",
        key=None,
        namespace="shop",
        now=START + timedelta(minutes=1),
    )
    assert lines[0].startswith(f"{path}: shop: rollout v1 -> v3 paused at 2026-12-01T12:01")
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["routes.yaml"]  # no temporary file left
    command = shlex.split(lines[-1])
    assert command[:7] == [
        "kubectl", "patch", "configmap", "shop-routes", "--namespace", "shop", "--type",
    ]  # fmt: skip
    assert json.loads(command[-1]) == {"data": {"routes.yaml": path.read_text()}}
