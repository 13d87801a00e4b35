"""Aggregate samples, compare with HAProxy, print the table and targets, write JSON and PNG."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "tcpproxy-bench/1"
REFERENCE = "haproxy"
DIRECT = "direct"


@dataclass(frozen=True)
class Metric:
    key: str
    workload: str
    title: str
    unit: str
    higher_is_better: bool
    derived: bool = False  # computed from other metrics of the same round
    diagnostic: bool = False  # the proxy's CPU cost: explains the figures, no target


METRICS: tuple[Metric, ...] = (
    Metric("bulk_gbit_s", "bulk", "bulk throughput, 1 stream (iperf3)", "Gbit/s", True),
    Metric("rr_req_s", "rr", "request/response, kept-alive (redis GET)", "req/s", True),
    Metric("conn_per_s", "conn", "new connections, server closes first", "conn/s", True),
    Metric(
        "conn_client_close_per_s", "conn", "new connections, client closes first", "conn/s", True
    ),
    Metric("latency_p50_us", "latency", "latency p50 at a fixed rate", "us", False),
    Metric("latency_p99_us", "latency", "latency p99 at a fixed rate", "us", False),
    Metric("added_p50_us", "latency", "added latency p50 (vs direct)", "us", False, True),
    Metric("added_p99_us", "latency", "added latency p99 (vs direct)", "us", False, True),
    Metric("idle_kib_per_conn", "memory", "memory per idle proxied connection", "KiB", False),
    Metric(
        "blocked_kib_per_conn",
        "blocked",
        "memory per connection, both directions blocked",
        "KiB",
        False,
    ),
    Metric("cpu_ms_per_gb", "bulk", "proxy CPU per GB, bulk", "ms/GB", False, diagnostic=True),
    Metric("cpu_us_per_req", "rr", "proxy CPU per request", "us/req", False, diagnostic=True),
    Metric(
        "cpu_us_per_conn",
        "conn",
        "proxy CPU per new connection, server closes",
        "us/conn",
        False,
        diagnostic=True,
    ),
    Metric(
        "cpu_us_per_conn_client_close",
        "conn",
        "proxy CPU per new connection, client closes",
        "us/conn",
        False,
        diagnostic=True,
    ),
)
# A measurement's main metric -> its proxy CPU seconds / work done metric (diagnostic).
CPU_METRICS: dict[str, tuple[str, float]] = {
    "bulk_gbit_s": ("cpu_ms_per_gb", 1e12),  # work in bytes
    "rr_req_s": ("cpu_us_per_req", 1e6),  # work in requests
    "conn_per_s": ("cpu_us_per_conn", 1e6),  # work in connections
    "conn_client_close_per_s": ("cpu_us_per_conn_client_close", 1e6),
}
WORKLOADS: tuple[str, ...] = ("bulk", "rr", "conn", "latency", "memory", "blocked")
# Memory workloads measure a proxy process: nothing to measure for direct.
PROXY_ONLY_WORKLOADS = frozenset({"memory", "blocked"})
PEERS_SHOWN = (("haproxy", "HAProxy"), ("nginx", "nginx"))


@dataclass(frozen=True)
class Check:
    metric: str
    requirement: str
    kind: str  # ratio_min | abs_max | diff_max
    bound: float
    floor: float | None = None  # ratio_min: below the target, the least that is acceptable


CHECKS: tuple[Check, ...] = (
    Check(
        "conn_per_s",
        "new connections/s, server closes first, >= 1.0x HAProxy (floor 0.8x)",
        "ratio_min",
        1.0,
        0.8,
    ),
    Check(
        "conn_client_close_per_s",
        "new connections/s, client closes first, >= 1.0x HAProxy (floor 0.8x)",
        "ratio_min",
        1.0,
        0.8,
    ),
    Check("rr_req_s", "kept-alive request rate >= 1.0x HAProxy", "ratio_min", 1.0),
    Check("bulk_gbit_s", "bulk throughput >= 1.2x HAProxy", "ratio_min", 1.2),
    Check("idle_kib_per_conn", "memory per idle proxied connection <= 4 KiB", "abs_max", 4.0),
    Check(
        "blocked_kib_per_conn",
        "memory per connection, both directions blocked, <= 64 KiB",
        "abs_max",
        64.0,
    ),
    Check("added_p99_us", "p99 added latency within 0.2 ms of HAProxy's", "diff_max", 200.0),
)


class Samples:
    """metric -> target -> per-round values (None: not applicable / failed) and errors."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}
        self.errors: dict[str, dict[str, list[str]]] = {}

    def add(self, metric: str, target: str, value: float | None) -> None:
        bucket = self.values.setdefault(metric, {}).setdefault(target, [])
        if value is not None and math.isfinite(value):
            bucket.append(value)

    def fail(self, metrics: Sequence[str], target: str, error: str) -> None:
        for metric in metrics:
            self.values.setdefault(metric, {}).setdefault(target, [])
            self.errors.setdefault(metric, {}).setdefault(target, []).append(error)


def add_derived(samples: Samples, round_latency: Mapping[str, Mapping[str, float]]) -> None:
    """Added latency per round: a target's percentile minus direct's in the same round."""
    direct = round_latency.get(DIRECT)
    for target, values in round_latency.items():
        for pct in ("p50", "p99"):
            key = f"added_{pct}_us"
            if target == DIRECT or direct is None:
                samples.add(key, target, None)
            else:
                samples.add(key, target, values[f"latency_{pct}_us"] - direct[f"latency_{pct}_us"])


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: Samples, targets: Sequence[str], workloads: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METRICS:
        # A metric a run did not measure at all (e.g. one close order only) is left out.
        if m.workload not in workloads or m.key not in samples.values:
            continue
        per_target = samples.values.get(m.key, {})
        ref = _median(per_target.get(REFERENCE, []))
        results: dict[str, Any] = {}
        for t in targets:
            med = _median(per_target.get(t, []))
            ratio = med / ref if med is not None and ref not in (None, 0.0) else None
            results[t] = {
                "median": _round(med),
                "samples": [_round(v) for v in per_target.get(t, [])],
                "ratio_to_haproxy": _round(ratio, 3),
                "errors": samples.errors.get(m.key, {}).get(t, []),
            }
        out[m.key] = {
            "workload": m.workload,
            "title": m.title,
            "unit": m.unit,
            "higher_is_better": m.higher_is_better,
            "results": results,
        }
    return out


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None:
        return None
    return float(f"{value:.{digits}g}") if abs(value) < 1000 else round(value, 1)


def evaluate_checks(metrics: Mapping[str, Any], targets: Sequence[str]) -> list[dict[str, Any]]:
    """Each target in `targets` (tcpproxy as users run it) against every check measured."""
    checks: list[dict[str, Any]] = []
    for t in targets:
        for c in CHECKS:
            if c.metric not in metrics:
                continue
            res = metrics[c.metric]["results"]
            mine = res.get(t, {}).get("median")
            ref = res.get(REFERENCE, {}).get("median")
            measured: float | None
            met: bool | None
            above_floor: bool | None = None
            if c.kind == "ratio_min":
                measured = res.get(t, {}).get("ratio_to_haproxy")
                met = None if measured is None else measured >= c.bound
                if c.floor is not None and measured is not None:
                    above_floor = measured >= c.floor
                shown = "n/a" if measured is None else f"{measured:.2f}x"
            elif c.kind == "abs_max":
                measured = mine
                met = None if mine is None else mine <= c.bound
                shown = "n/a" if mine is None else f"{mine:.2f} KiB"
                peers = [
                    f"{label} {res[key]['median']:.2f}"
                    for key, label in PEERS_SHOWN
                    if res.get(key, {}).get("median") is not None
                ]
                if peers:
                    shown += f" ({', '.join(peers)} KiB)"
            else:
                measured = None if mine is None or ref is None else mine - ref
                met = None if measured is None else measured <= c.bound
                shown = (
                    "n/a"
                    if measured is None
                    else (f"{measured:+.0f} us vs HAProxy ({mine:.0f} vs {ref:.0f} us)")
                )
            entry: dict[str, Any] = {
                "target": t,
                "metric": c.metric,
                "requirement": c.requirement,
                "measured": _round(measured, 3),
                "shown": shown,
                "met": met,
            }
            if c.floor is not None:
                entry["floor"] = c.floor
                entry["above_floor"] = above_floor
            checks.append(entry)
    return checks


def access_log_cost(metrics: Mapping[str, Any], pairs: Mapping[str, str]) -> dict[str, Any]:
    """For each target with the access log on -> its twin with it off: every figure both
    have, and off / on (above 1 for a rate means the log costs that much)."""
    out: dict[str, Any] = {}
    for on, off in pairs.items():
        rows: dict[str, dict[str, float | None]] = {}
        for m in METRICS:
            if m.key not in metrics:
                continue
            res = metrics[m.key]["results"]
            a, b = res.get(on, {}).get("median"), res.get(off, {}).get("median")
            if a is None or b is None:
                continue
            rows[m.key] = {"on": a, "off": b, "off_vs_on": _round(b / a, 3) if a else None}
        out[on] = {"without_access_log": off, "metrics": rows}
    return out


def access_log_text(cost: Mapping[str, Any]) -> str:
    units = {m.key: (m.title, m.unit) for m in METRICS}
    lines = []
    for on, entry in cost.items():
        lines.append(f"  {on} (access log on) vs {entry['without_access_log']} (off):")
        for key, r in entry["metrics"].items():
            title, unit = units[key]
            ratio = "" if r["off_vs_on"] is None else f" (off/on {r['off_vs_on']:.3f})"
            lines.append(
                f"    {title}: {_fmt(r['on'], unit)} on, {_fmt(r['off'], unit)} off {unit}{ratio}"
            )
    return "\n".join(lines)


# --- text -----------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "conn/s"):
        return f"{value / 1000:.1f}k"
    if unit.startswith(("us", "ms")):
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"
    return f"{value:.2f}"


def table(metrics: Mapping[str, Any], targets: Sequence[str], diagnostic: bool = False) -> str:
    head = ["metric", "unit", *targets]
    rows: list[list[str]] = []
    for m in METRICS:
        if m.key not in metrics or m.diagnostic != diagnostic:
            continue
        # A ratio of absolute latencies says little (the backend's share is in both).
        show_ratio = m.derived or not m.key.startswith("latency_")
        row = [m.title, m.unit]
        for t in targets:
            r = metrics[m.key]["results"].get(t, {})
            median, ratio = r.get("median"), r.get("ratio_to_haproxy")
            cell = _fmt(median, m.unit)
            if m.derived and median is not None and median >= 0:
                cell = "+" + cell
            if show_ratio and ratio is not None:
                cell += f" ({ratio:.2f}x)"
            if r.get("errors") and median is None:
                cell = "FAILED"
            row.append(cell)
        rows.append(row)
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def checks_text(checks: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[c["met"]]
        if c["met"] is False and c.get("above_floor") is not None:
            side = "above" if c["above_floor"] else "below"
            verdict += f" ({side} the {c['floor']:.1f}x floor)"
        lines.append(f"  {c['target']}: {c['requirement']}: {c['shown']}: {verdict}")
    return "\n".join(lines)


def header_text(machine: Mapping[str, Any], versions: Mapping[str, str]) -> str:
    peers = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        f"machine: {machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"kernel {machine['kernel']}, {machine['os']}\n"
        f"python: {machine['python']}, uvloop {machine['uvloop']}, "
        f"tcpproxy {machine['tcpproxy']}\n"
        f"peers: {peers}"
    )


# --- files ----------------------------------------------------------------------------------


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


PNG_METRICS = (
    "bulk_gbit_s",
    "rr_req_s",
    "conn_per_s",
    "conn_client_close_per_s",
    "added_p50_us",
    "added_p99_us",
    "idle_kib_per_conn",
    "blocked_kib_per_conn",
)


def write_png(path: Path, doc: Mapping[str, Any]) -> None:
    # matplotlib is the optional `bench` extra, and slow to import: load it only here.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    metrics: Mapping[str, Any] = doc["metrics"]
    shown = [k for k in PNG_METRICS if k in metrics]
    targets: list[str] = list(doc["targets"])
    if not shown:
        return
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = {
        "direct": "#9e9e9e",
        "haproxy": "#1f77b4",
        "nginx": "#2ca02c",
    }
    palette = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b"]
    for i, t in enumerate(t for t in targets if t not in colors):
        colors[t] = palette[i % len(palette)]
    for ax, key in zip(axes.flat, shown, strict=False):
        m = metrics[key]
        names = [t for t in targets if m["results"].get(t, {}).get("median") is not None]
        values = [float(m["results"][t]["median"]) for t in names]
        bars = ax.bar(range(len(names)), values, color=[colors[t] for t in names])
        for bar, t in zip(bars, names, strict=True):
            ratio = m["results"][t].get("ratio_to_haproxy")
            label = _fmt(bar.get_height(), m["unit"])
            if ratio is not None:
                label += f"\n{ratio:.2f}x"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=7)
        better = "higher is better" if m["higher_is_better"] else "lower is better"
        ax.set_title(f"{m['title']}\n{m['unit']}, {better}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.25)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    mach = doc["machine"]
    fig.suptitle(
        f"tcpproxy benchmark ({doc['mode']}, {doc['started_at'][:16]}): {mach['cores']} cores, "
        f"kernel {mach['kernel']}, {mach['python']}, uvloop {mach['uvloop']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
