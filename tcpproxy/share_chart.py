"""The status page's share chart as geometry: pure (data in, coordinates out), no markup.

One stacked column per sampling interval: each backend's share of the new connections in
that interval, 0-100%. An interval with no new connections has no column, so an idle minute
shows as a gap, never as a slow shift. Over it: the rollout's scheduled share for its target
(a step line), its step starts, pauses and end, and the moments reloads were applied or
rejected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 960, 230
LEFT, RIGHT, TOP, BOTTOM = 44, 14, 40, 26  # margins: axis labels left and below, marks above
# Time-axis tick spacings to choose from: the smallest that gives at most MAX_TICKS.
TICK_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
MAX_TICKS = 10
LABEL_ROWS = 3  # rows for marker labels above the plot, so that close ones do not overlap
MERGE_PX = 4.0  # marks closer than this share one line and one label
# The time axis starts where the history does (a young proxy has no "before"), showing at
# least this many intervals.
MIN_SPAN_INTERVALS = 12
_PRIORITY = ("rejected", "end", "step", "reload")  # the kind a shared line is drawn as
LABEL_CHAR_PX = 6.2  # about one character of the 11px label font
GONE_COLOUR = "#9aa1ad"


@dataclass(frozen=True)
class Segment:
    y: float
    height: float
    colour: str


@dataclass(frozen=True)
class Column:
    x: float
    width: float
    title: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Marker:
    x: float
    kind: str  # step, reload, rejected, end
    label: str
    title: str
    row: int = 0  # which label row
    anchor: str = "start"  # "end": the label is left of the line (near the right edge)


@dataclass(frozen=True)
class Span:
    x: float
    width: float
    label: str


@dataclass(frozen=True)
class Tick:
    at: float  # x (time axis) or y (share axis)
    label: str


@dataclass
class Chart:
    window_s: float
    left: float = LEFT
    top: float = TOP
    right: float = WIDTH - RIGHT
    bottom: float = HEIGHT - BOTTOM
    width: int = WIDTH
    height: int = HEIGHT
    columns: list[Column] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    target: str = ""  # SVG path of the rollout's scheduled share for its target
    target_name: str = ""
    empty: bool = True  # no new connections in the whole window

    def x(self, at: float, now: float) -> float:
        frac = (at - (now - self.window_s)) / self.window_s
        return self.left + min(max(frac, 0.0), 1.0) * (self.right - self.left)

    def y(self, share: float) -> float:
        return self.bottom - min(max(share, 0.0), 1.0) * (self.bottom - self.top)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"


def build(
    history: Sequence[Mapping[str, Any]],
    colours: Mapping[str, str],
    now: float,
    window_s: float,
    interval_s: float,
    *,
    reloads: Sequence[Mapping[str, Any]] = (),
    rollout: Mapping[str, Any] | None = None,
) -> Chart:
    """`history`: share_history() of a listener, oldest first (each entry covers the time
    since the one before; the first, `interval_s` before its `at`). `colours`: backend name ->
    colour, in stacking order (bottom first), except that a rollout's target is stacked at
    the bottom, where its column height reads against the rollout's share line."""
    if rollout is not None and rollout["to"] in colours:
        to = str(rollout["to"])
        colours = {to: colours[to], **{n: c for n, c in colours.items() if n != to}}
    earliest = float(history[0]["at"]) - interval_s if history else now
    # The first config applied comes just before the history's first interval begins.
    earliest = min([earliest, *(float(r["at"]) for r in reloads if r["at"] >= now - window_s)])
    chart = Chart(min(window_s, max(now - earliest, MIN_SPAN_INTERVALS * interval_s)))
    start = now - chart.window_s
    _axes(chart, now)
    previous: float | None = None
    for entry in history:
        at = float(entry["at"])
        begin = previous if previous is not None else at - interval_s
        previous = at
        if not entry["connections"] or at <= start:
            continue
        x0, x1 = chart.x(begin, now), chart.x(at, now)
        shares: Mapping[str, float] = entry["share"]
        segments, level = [], 0.0
        # Backends gone from the listener since (drained away) are grey, on top.
        stack = [*colours.items(), *((n, GONE_COLOUR) for n in shares if n not in colours)]
        for name, colour in stack:
            share = shares.get(name, 0.0)
            if share > 0:
                top = chart.y(level + share)
                segments.append(Segment(top, chart.y(level) - top, colour))
                level += share
        parts = ", ".join(f"{n} {_pct(s)}" for n, s in shares.items() if s > 0)
        title = f"{_clock(begin)}-{_clock(at)} UTC: {entry['connections']} new ({parts})"
        chart.columns.append(Column(x0, max(x1 - x0 - 0.5, 0.5), title, tuple(segments)))
    chart.empty = not chart.columns
    marks: list[tuple[float, str, str, str]] = []
    for reload in reloads:
        at = float(reload["at"])
        if at < start or reload["result"] not in ("success", "failure"):
            continue
        ok = reload["result"] == "success"
        what = reload.get("summary") or ("applied" if ok else "rejected, old config serving")
        title = f"{_clock(at)} UTC: reload ({reload['trigger']}) {what}"
        label = ("start" if reload["trigger"] == "startup" else "reload") if ok else "rejected"
        marks.append((at, "reload" if ok else "rejected", label, title))
    if rollout is not None:
        _rollout_marks(chart, rollout, now, marks)
    _place_labels(chart, marks, now)
    return chart


def _axes(chart: Chart, now: float) -> None:
    chart.y_ticks = [Tick(chart.y(p / 100), f"{p}%") for p in (0, 25, 50, 75, 100)]
    every = next((s for s in TICK_STEPS_S if chart.window_s / s <= MAX_TICKS), TICK_STEPS_S[-1])
    spec = "%H:%M" if every >= 60 else "%H:%M:%S"
    at = (now - chart.window_s) // every * every + every
    while at <= now:
        chart.x_ticks.append(Tick(chart.x(at, now), time.strftime(spec, time.gmtime(at))))
        at += every


def _rollout_marks(
    chart: Chart, rollout: Mapping[str, Any], now: float, marks: list[tuple[float, str, str, str]]
) -> None:
    start = now - chart.window_s
    chart.target_name = str(rollout["to"])
    starts = rollout.get("step_starts") or []
    # The step's share is of the pair's part: other backends keep theirs.
    part = float(rollout.get("pair_part", 1.0))
    path: list[str] = []
    for i, step in enumerate(starts):
        at, share = float(step["at"]), int(step["share"])
        until = float(starts[i + 1]["at"]) if i + 1 < len(starts) else now
        ended = rollout.get("ended_at")
        if ended is not None and i + 1 == len(starts) and rollout["state"] == "aborted":
            until = min(until, float(ended))
        if until > start:
            y = chart.y(share / 100 * part)
            path.append(f"M{chart.x(at, now):.1f},{y:.1f}H{chart.x(until, now):.1f}")
        if at >= start:
            number = int(step["step"])
            label = f"step {number}: {share}%" if number <= len(rollout["steps"]) else "100%"
            title = f"{_clock(at)} UTC: rollout step {step['step']}: {share}% to {rollout['to']}"
            marks.append((at, "step", label, title))
    ended = rollout.get("ended_at")
    if ended is not None and rollout["state"] == "aborted" and float(ended) < now:
        y = chart.y(0.0)  # an aborted rollout sends nothing to its target
        path.append(f"M{chart.x(float(ended), now):.1f},{y:.1f}H{chart.x(now, now):.1f}")
    chart.target = "".join(path)
    for pause in rollout.get("pauses") or []:
        begin = float(pause["from"])
        until = now if pause["until"] is None else float(pause["until"])
        if until > start:
            x0 = chart.x(begin, now)
            chart.spans.append(Span(x0, chart.x(until, now) - x0, "paused"))
    ended = rollout.get("ended_at")
    if ended is not None and float(ended) >= start and rollout["state"] in ("aborted", "completed"):
        title = f"{_clock(float(ended))} UTC: rollout {rollout['state']}"
        if rollout.get("reason"):
            title += f": {rollout['reason']}"
        marks.append((float(ended), "end", str(rollout["state"]), title))


def _place_labels(chart: Chart, marks: list[tuple[float, str, str, str]], now: float) -> None:
    """Marks closer than MERGE_PX share a line and a label; each label goes in the first row
    where it runs into no other, or is left out (its line and tooltip stay) when none has
    room."""
    groups: list[tuple[float, list[str], list[str], list[str]]] = []
    for at, kind, label, title in sorted(marks):
        x = chart.x(at, now)
        if groups and x - groups[-1][0] < MERGE_PX:
            groups[-1][1].append(kind)
            groups[-1][2].append(label)
            groups[-1][3].append(title)
        else:
            groups.append((x, [kind], [label], [title]))
    ends = [-1e9] * LABEL_ROWS
    for x, kinds, labels, titles in groups:
        kind = min(kinds, key=_PRIORITY.index)
        label = " · ".join(dict.fromkeys(labels))
        title = "\n".join(titles)
        width = 6 + len(label) * LABEL_CHAR_PX
        anchor = "end" if x + width > chart.width else "start"
        low = x - width if anchor == "end" else x
        row = next((r for r in range(LABEL_ROWS) if ends[r] < low), None)
        if row is None:
            chart.markers.append(Marker(x, kind, "", title, LABEL_ROWS - 1, anchor))
            continue
        ends[row] = low + width
        chart.markers.append(Marker(x, kind, label, title, row, anchor))
