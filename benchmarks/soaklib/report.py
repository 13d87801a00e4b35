"""The soak's verdict and its report: checks with figures, JSON summary, PNG plot, text."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "tcpproxy-soak/1"
# Resource samples: [t_s, rss_kib, fds, open_connections, cpu_s, threads, sockets, pipes]
T, RSS, FDS, OPEN, CPU, THREADS, SOCKETS, PIPES = range(8)
# After warm-up, compare the first and the last fifth of the samples.
WINDOW_FRACTION = 0.2
# RSS may move this much between those windows and still be "flat": the larger of a fixed
# floor (allocator and GC noise) and a share of the warm RSS.
RSS_GROWTH_FLOOR_KIB = 4 * 1024
RSS_GROWTH_SHARE = 0.05
# sockets - 2 x open connections (what is left when connections are accounted for) may wander
# by this much: sampling /proc and /status is not atomic while connections open and close.
# Pipes are left out: the splice engine takes them per connection and pools idle ones.
FD_RESIDUAL_TOLERANCE = 3


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: object
    limit: str
    gating: bool = True  # informational checks are reported but do not decide the verdict
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "value": self.value,
            "limit": self.limit,
            "gating": self.gating,
            "note": self.note,
        }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _slope_per_min(ts: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(ts) < 3:
        return None
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return None
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den


def resources(
    samples: Sequence[Sequence[float]],
    warmup_s: float,
    quiescent_start: Mapping[str, int],
    quiescent_end: Mapping[str, int] | None,
) -> dict[str, Any]:
    """RSS and fd figures: at rest before and after the load, and flatness after warm-up."""
    warm = [s for s in samples if s[T] >= warmup_s]
    n = max(1, int(len(warm) * WINDOW_FRACTION))
    first, last = warm[:n], warm[-n:]

    def stat(rows: Sequence[Sequence[float]], col: int) -> float | None:
        return _median([r[col] for r in rows])

    def residual(rows: Sequence[Sequence[float]]) -> float | None:
        return _median([r[SOCKETS] - 2 * r[OPEN] for r in rows])

    rss_first, rss_last = stat(first, RSS), stat(last, RSS)
    res_first, res_last = residual(first), residual(last)
    return {
        "warmup_s": warmup_s,
        "samples_after_warmup": len(warm),
        "window_samples": n,
        "rss_kib": {
            "start_at_rest": quiescent_start.get("rss_kib"),
            "end_at_rest": quiescent_end.get("rss_kib") if quiescent_end else None,
            "after_warmup_median": rss_first,
            "end_of_load_median": rss_last,
            "growth_after_warmup": None
            if rss_first is None or rss_last is None
            else rss_last - rss_first,
            "slope_after_warmup_per_min": _slope_per_min(
                [r[T] for r in warm], [r[RSS] for r in warm]
            ),
            "slope_second_half_per_min": _slope_per_min(
                [r[T] for r in warm[len(warm) // 2 :]], [r[RSS] for r in warm[len(warm) // 2 :]]
            ),
            "max": max((r[RSS] for r in samples), default=None),
        },
        "fds": {
            "start_at_rest": quiescent_start.get("fds"),
            "end_at_rest": quiescent_end.get("fds") if quiescent_end else None,
            "sockets_start_at_rest": quiescent_start.get("sockets"),
            "sockets_end_at_rest": quiescent_end.get("sockets") if quiescent_end else None,
            "pipes_end_at_rest": quiescent_end.get("pipes") if quiescent_end else None,
            "pipes_max": max((r[PIPES] for r in samples), default=None),
            "after_warmup_median": stat(first, FDS),
            "end_of_load_median": stat(last, FDS),
            "max": max((r[FDS] for r in samples), default=None),
            "residual_after_warmup_median": res_first,
            "residual_end_of_load_median": res_last,
            "residual_growth": None
            if res_first is None or res_last is None
            else res_last - res_first,
        },
        "open_connections_max": max((r[OPEN] for r in samples), default=None),
        "threads_max": max((r[THREADS] for r in samples), default=None),
        "proxy_cpu_s": samples[-1][CPU] if samples else None,
    }


def rss_limit_kib(after_warmup_kib: float) -> float:
    return max(RSS_GROWTH_FLOOR_KIB, RSS_GROWTH_SHARE * after_warmup_kib)


def verdict(checks: Sequence[Check]) -> dict[str, Any]:
    failed = [c for c in checks if c.gating and not c.ok]
    return {
        "pass": not failed,
        "reasons": [
            f"{c.name}: {c.value} (limit {c.limit}){' - ' + c.note if c.note else ''}"
            for c in failed
        ],
    }


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def write_png(path: Path, doc: Mapping[str, Any]) -> None:
    # matplotlib is the optional `bench` extra, and slow to import: load it only here.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    res = doc["resources"]
    rows: list[list[float]] = res["samples"]
    ts = [r[T] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(ts, [r[RSS] / 1024 for r in rows], color="#d62728", lw=1.2, label="RSS")
    ax1.set_ylabel("proxy RSS (MiB)")
    # Zoomed on the data (a few MiB either side): growth is what this plot is for.
    rss = [r[RSS] / 1024 for r in rows] or [0.0]
    ax1.set_ylim(max(0.0, min(rss) - 4), max(rss) + 4)
    ax2.plot(ts, [r[FDS] for r in rows], color="#1f77b4", lw=1.2, label="open fds")
    ax2.plot(ts, [2 * r[OPEN] for r in rows], color="#9e9e9e", lw=0.8, label="2 x open connections")
    ax2.plot(
        ts,
        [r[SOCKETS] - 2 * r[OPEN] for r in rows],
        color="#2ca02c",
        lw=1.2,
        label="sockets - 2 x connections",
    )
    ax2.plot(ts, [r[PIPES] for r in rows], color="#9467bd", lw=0.8, label="pipes (splice)")
    ax2.set_ylabel("proxy file descriptors")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylim(bottom=0)
    writes = [w["t"] for w in doc["reloads"]["writes"]]
    low = max(0.0, min(rss) - 4)
    ax1.plot(writes, [low + 0.3] * len(writes), "|", color="#555", ms=8, label="config writes")
    for ax in (ax1, ax2):
        ax.axvspan(0, res["summary"]["warmup_s"], color="#f0f0f0", zorder=0)
        for t in doc["backends"]["kill_times_s"]:
            ax.axvline(t, color="#ff7f0e", lw=0.5, alpha=0.5, zorder=1)
        ax.grid(alpha=0.3)
    ax2.legend(loc="upper left", fontsize=7)
    ax1.text(
        0.01,
        0.9,
        "shaded: warm-up; orange lines: backend kills/restarts; ticks: config writes",
        transform=ax1.transAxes,
        fontsize=7,
        color="#555",
    )
    v = doc["verdict"]
    mach = doc["machine"]
    fig.suptitle(
        f"tcpproxy soak ({doc['mode']}, {doc['duration_s']:.0f}s, {doc['started_at'][:16]}): "
        f"{'PASS' if v['pass'] else 'FAIL'}; lost {doc['bytes']['lost']} B, "
        f"unexpected closes {doc['connections']['unexpected_closes']}\n"
        f"{mach['cores']} cores, kernel {mach['kernel']}, {mach['python']}, "
        f"uvloop {mach['uvloop']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _mib(kib: object) -> str:
    return f"{kib / 1024:.1f} MiB" if isinstance(kib, int | float) else "-"


def text(doc: Mapping[str, Any]) -> str:
    c, b, r = doc["connections"], doc["bytes"], doc["reloads"]
    rss, fds = doc["resources"]["summary"]["rss_kib"], doc["resources"]["summary"]["fds"]
    lines = [
        f"tcpproxy soak ({doc['mode']}): {doc['duration_s']:.0f}s of load, "
        f"seed {doc['seed']}, engines {doc['engines']}, {doc['machine']['cores']} cores, "
        f"{doc['machine']['python']}",
        "",
        f"connections opened: {c['opened']}  "
        + ", ".join(f"{k} {v}" for k, v in c["opened_by_kind"].items()),
        "closed by cause:    " + ", ".join(f"{k} {v}" for k, v in c["closed_by_cause"].items()),
        "proxy end reasons:  " + ", ".join(f"{k} {v}" for k, v in c["proxy_end_reasons"].items()),
        f"unexpected closes:  {c['unexpected_closes']}",
        "hostile patterns:   (kind.variant@listener: causes)",
        *(
            f"  {key}: " + ", ".join(f"{k} {n}" for k, n in causes.items())
            for key, causes in doc.get("hostile", {}).items()
        ),
        "",
        f"bytes relayed:      up {b['relayed_up']:,}, down {b['relayed_down']:,}",
        f"bytes verified:     {b['verified']:,} of {b['expected']:,} expected "
        f"({b['in_flight_on_broken']:,} in flight on legitimately broken connections)",
        f"lost bytes:         {b['lost']:,}",
        f"corrupted bytes:    {b['corrupted']:,}",
        "",
        f"config writes:      {r['good_writes']} good ({r['applied_confirmed']} confirmed), "
        f"{r['bad_writes']} bad ({r['rejected_confirmed']} confirmed rejected); "
        f"SIGHUP {r['sighups']}, POST /-/reload {r['admin_reloads']}",
        f"reloads (metrics):  applied {r['applied']}, rejected {r['rejected']}",
        f"backends:           {doc['backends']['kills']} killed (SIGKILL), "
        f"{doc['backends']['terms']} restarted (SIGTERM)",
        "",
        f"proxy RSS:          at rest {_mib(rss['start_at_rest'])} -> {_mib(rss['end_at_rest'])}; "
        f"after warm-up {_mib(rss['after_warmup_median'])} -> end of load "
        f"{_mib(rss['end_of_load_median'])}; max {_mib(rss['max'])}",
        f"proxy fds:          at rest {fds['start_at_rest']} -> {fds['end_at_rest']} "
        f"(sockets {fds['sockets_start_at_rest']} -> {fds['sockets_end_at_rest']}, "
        f"splice pipes incl.); "
        f"sockets - 2 x connections after warm-up {fds['residual_after_warmup_median']} -> "
        f"{fds['residual_end_of_load_median']}; max {fds['max']}",
        "",
        "checks:",
    ]
    for ch in doc["checks"]:
        mark = "ok  " if ch["ok"] else ("FAIL" if ch["gating"] else "warn")
        lines.append(f"  {mark} {ch['name']}: {ch['value']} (limit {ch['limit']})")
    v = doc["verdict"]
    lines.append("")
    lines.append("verdict: " + ("PASS" if v["pass"] else "FAIL"))
    lines += [f"  - {reason}" for reason in v["reasons"]]
    return "\n".join(lines)
