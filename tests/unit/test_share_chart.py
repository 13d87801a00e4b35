"""The status page's share chart geometry: gaps stay gaps, columns stay in the plot."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tcpproxy import share_chart

NOW = 1_000_000.0
INTERVAL = 5.0
WINDOW = 600.0
COLOURS = {"v1": "#111", "v2": "#222", "v3": "#333"}

counts = st.fixed_dictionaries(
    {name: st.integers(min_value=0, max_value=3) for name in ("v1", "v2", "v3", "gone")}
)


def history(per_interval: list[dict[str, int]]) -> list[dict[str, Any]]:
    """What BackendPool.share_history returns for these new-connection counts, the last
    interval ending now."""
    out = []
    for i, new in enumerate(per_interval):
        total = sum(new.values())
        at = NOW - (len(per_interval) - 1 - i) * INTERVAL
        share = {n: c / total for n, c in new.items()} if total else {}
        out.append({"at": at, "connections": total, "share": share})
    return out


@given(st.lists(counts, max_size=150))
def test_columns_only_where_connections_were_and_fill_the_axis(
    per_interval: list[dict[str, int]],
) -> None:
    chart = share_chart.build(history(per_interval), COLOURS, NOW, WINDOW, INTERVAL)
    full = chart.bottom - chart.top
    busy = []
    for i, new in enumerate(per_interval):
        end = NOW - (len(per_interval) - 1 - i) * INTERVAL
        if sum(new.values()) and end > NOW - WINDOW:
            busy.append((chart.x(end - INTERVAL, NOW), chart.x(end, NOW)))
    assert len(chart.columns) == len(busy)
    assert chart.empty == (not busy)
    for column, (x0, x1) in zip(chart.columns, busy, strict=True):
        # Within its own interval: nothing is drawn across an idle one.
        assert x0 - 1e-6 <= column.x
        assert column.x + column.width <= x1 + 1e-6
        assert chart.left - 1e-6 <= column.x <= chart.right
        height = sum(seg.height for seg in column.segments)
        assert abs(height - full) < 1e-6
        for seg in column.segments:
            assert chart.top - 1e-6 <= seg.y
            assert seg.y + seg.height <= chart.bottom + 1e-6


def test_axes_markers_and_the_rollout_line() -> None:
    reloads = [
        {"at": NOW - 300, "result": "success", "trigger": "watch", "summary": "app: v2 added"},
        {"at": NOW - 299, "result": "failure", "trigger": "admin", "summary": ""},
        {"at": NOW - 5000, "result": "success", "trigger": "startup", "summary": ""},
    ]
    rollout = {
        "to": "v2",
        "state": "paused",
        "steps": [25, 75],
        "reason": "",
        "step_starts": [
            {"at": NOW - 240, "step": 1, "share": 25},
            {"at": NOW - 120, "step": 2, "share": 75},
        ],
        "pauses": [{"from": NOW - 60, "until": None}],
        "ended_at": None,
    }
    idle = history([{}] * 120)  # ten minutes of history, no new connections
    chart = share_chart.build(
        idle, COLOURS, NOW, WINDOW, INTERVAL, reloads=reloads, rollout=rollout
    )
    assert [t.label for t in chart.y_ticks] == ["0%", "25%", "50%", "75%", "100%"]
    assert len(chart.x_ticks) == 10  # one a minute over ten minutes
    kinds = [(m.kind, m.label) for m in chart.markers]
    # The reload and the rejection one second apart (under MERGE_PX): one line, one label.
    assert kinds == [
        ("rejected", "reload · rejected"),
        ("step", "step 1: 25%"),
        ("step", "step 2: 75%"),
    ]
    young = share_chart.build(history([{"v1": 1}] * 3), COLOURS, NOW, WINDOW, INTERVAL)
    assert young.window_s == share_chart.MIN_SPAN_INTERVALS * INTERVAL
    assert [round(s.width) for s in chart.spans] == [
        round(60 / WINDOW * (chart.right - chart.left))
    ]
    assert chart.target.count("M") == 2
    assert chart.empty
