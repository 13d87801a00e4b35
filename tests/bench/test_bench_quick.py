"""The benchmark harness works: one `--quick` run writes a well-formed report.

No timing is asserted here (figures depend on the machine); only that every workload was
measured through every target, or was skipped with a stated reason: new connections in both
close orders, and memory with both directions blocked, included.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench.py"
RUN_TIMEOUT_S = 270

METRICS_BY_WORKLOAD = {
    "bulk": ("bulk_gbit_s", "cpu_ms_per_gb"),
    "rr": ("rr_req_s", "cpu_us_per_req"),
    "conn": (
        "conn_per_s",
        "cpu_us_per_conn",
        "conn_client_close_per_s",
        "cpu_us_per_conn_client_close",
    ),
    "latency": ("latency_p50_us", "latency_p99_us", "added_p50_us", "added_p99_us"),
    "memory": ("idle_kib_per_conn",),
    "blocked": ("blocked_kib_per_conn",),
}
# Figures that have no meaning without a proxy in the path.
NOT_FOR_DIRECT = {
    "cpu_ms_per_gb",
    "cpu_us_per_req",
    "cpu_us_per_conn",
    "cpu_us_per_conn_client_close",
    "added_p50_us",
    "added_p99_us",
    "idle_kib_per_conn",
    "blocked_kib_per_conn",
}
ALWAYS = ("direct", "tcpproxy-copy", "python-floor")
FLOOR_WORKLOADS = {"conn", "rr"}  # all the floor relay is made for
PEERS = ("haproxy", "nginx")  # may be skipped where they cannot be installed, with a reason
CHECKED = {
    "bulk_gbit_s",
    "rr_req_s",
    "conn_per_s",
    "conn_client_close_per_s",
    "idle_kib_per_conn",
    "blocked_kib_per_conn",
    "added_p99_us",
}
FLOORED = {"conn_per_s", "conn_client_close_per_s"}  # a target and a lower floor


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "quick.json", out / "quick.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--python-floor",
            "--baseline",
            "HEAD",
            "--json",
            str(json_path),
            "--png",
            str(png_path),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(json_path.read_text()), png_path, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_quick_run_measures_every_workload_through_every_target(
    quick_run: tuple[dict[str, Any], Path, str],
) -> None:
    doc, png_path, stdout = quick_run
    assert doc["schema"] == "tcpproxy-bench/1"
    assert doc["mode"] == "quick"
    for key in ("cores", "kernel", "python", "uvloop", "tcpproxy"):
        assert doc["machine"][key], key

    targets: list[str] = doc["targets"]
    for name in ALWAYS:
        assert name in targets, doc["skipped"].get(name)
    # The same engine as it was at a git revision, run beside it (and never checked).
    [baseline] = [t for t in targets if t.startswith("tcpproxy-copy@")]
    # Measured as users run it: the access log on (the default), and recorded as such.
    assert doc["access_log"]["tcpproxy-copy"] is True
    assert doc["params"]["conn_close"] == "both"
    for name in PEERS:
        assert name in targets or doc["skipped"].get(name), name
        if name in targets:
            assert doc["versions"][name]
    for workload in METRICS_BY_WORKLOAD:
        assert workload in doc["workloads"] or doc["skipped"].get(workload), workload

    for workload in doc["workloads"]:
        for metric in METRICS_BY_WORKLOAD[workload]:
            results = doc["metrics"][metric]["results"]
            assert doc["metrics"][metric]["unit"]
            for target in targets:
                result = results[target]
                assert result["errors"] == [], (metric, target, result["errors"])
                median = result["median"]
                if (target == "direct" and metric in NOT_FOR_DIRECT) or (
                    target == "python-floor" and workload not in FLOOR_WORKLOADS
                ):
                    assert median is None, (metric, target)
                    continue
                assert isinstance(median, int | float), (metric, target)
                assert math.isfinite(median), (metric, target)
                if "haproxy" in targets:
                    assert isinstance(result["ratio_to_haproxy"], int | float)

    if "haproxy" in targets:
        for target in (t for t in targets if t.startswith("tcpproxy") and t != baseline):
            checked = {c["metric"] for c in doc["checks"] if c["target"] == target}
            wanted = {m for w in doc["workloads"] for m in METRICS_BY_WORKLOAD[w] if m in CHECKED}
            assert checked == wanted, target
            assert all(isinstance(c["met"], bool) for c in doc["checks"])
            for c in doc["checks"]:
                assert ("above_floor" in c) == (c["metric"] in FLOORED), c
                if c["metric"] in FLOORED:
                    assert isinstance(c["above_floor"], bool), c

    assert not [c for c in doc["checks"] if c["target"] == baseline]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio to HAProxy" in stdout
