"""The status page (GET /): the /status data rendered from the Jinja2 templates shipped in
tcpproxy/templates. Self-contained: its style, script and chart are inline."""

from __future__ import annotations

import time
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from tcpproxy import pool, share_chart

PAGE_REFRESH_S = 2
# Share colours, one per backend in config order; no red or green, which mean state.
PALETTE = ("#3b6fd4", "#e08a1e", "#7a4fc4", "#1a9aa6", "#c2478f", "#7d8f2a", "#8c5a3c", "#555")


def fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def fmt_span(seconds: float) -> str:
    """42s, 4m 02s, 1h 05m: the same as fmtSpan in the page's script."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def fmt_when(unix: float | None, now: float) -> str:
    if unix is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    return f"{stamp} ({fmt_span(now - unix)} ago)"


_env = Environment(
    loader=PackageLoader("tcpproxy", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(bytes=fmt_bytes, span=fmt_span, when=fmt_when)


def _listener(lst: dict[str, Any], reloads: list[dict[str, Any]], now: float) -> dict[str, Any]:
    colours = {b["name"]: PALETTE[i % len(PALETTE)] for i, b in enumerate(lst["backends"])}
    # The time axis spans the share history the pool keeps.
    chart = share_chart.build(
        lst["history"],
        colours,
        now,
        pool.HISTORY_INTERVAL_S * pool.HISTORY_SAMPLES,
        pool.HISTORY_INTERVAL_S,
        reloads=reloads,
        rollout=lst["rollout"],
    )
    return {**lst, "colours": colours, "chart": chart}


def render_page(data: dict[str, Any]) -> str:
    now = time.time()
    return _env.get_template("status.html").render(
        data=data,
        listeners=[_listener(lst, data["reloads"], now) for lst in data["listeners"]],
        now=now,
        refresh_s=PAGE_REFRESH_S,
        refresh_ms=PAGE_REFRESH_S * 1000,
        interval_s=pool.HISTORY_INTERVAL_S,
        generated=time.strftime("%H:%M:%S UTC", time.gmtime(now)),
    )
