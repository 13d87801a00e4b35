"""The soak test, `--quick`: a minute of mixed traffic and churn through a real proxy process
must lose no byte, close nothing unexpectedly, and leave a well-formed report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "benchmarks" / "soak.py"
RUN_TIMEOUT_S = 240

KINDS = ("stream", "bulk", "request", "slow", "reset", "idle", "shutdown")
CHECKS = (
    "lost bytes",
    "corrupted bytes",
    "unexpected closes",
    "proxy error log lines",
    "exit after SIGTERM",
    "good config writes applied",
    "bad config writes rejected",
    "connections left in the proxy at the end",
    "fds at rest, end vs start (sockets + other)",
    "idle pipes at rest (splice pool)",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("soak")
    json_path, png_path = out / "soak.json", out / "soak.png"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--json", str(json_path), "--png", str(png_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        cwd=ROOT,
    )
    assert json_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(json_path.read_text()), png_path, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_soak_passes(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    doc, _, output = quick_run
    verdict = doc["verdict"]
    assert verdict["pass"], "\n".join(verdict["reasons"]) + "\n" + output[-4000:]
    assert doc["bytes"]["lost"] == 0
    assert doc["bytes"]["corrupted"] == 0
    assert doc["connections"]["unexpected_closes"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_soak_report_is_well_formed(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    doc, png_path, output = quick_run
    assert doc["schema"] == "tcpproxy-soak/1"
    assert doc["mode"] == "quick"
    for key in ("cores", "kernel", "python", "uvloop", "tcpproxy"):
        assert doc["machine"][key], key

    conns = doc["connections"]
    for kind in KINDS:
        assert conns["opened_by_kind"].get(kind, 0) > 0, kind
    assert sum(conns["closed_by_cause"].values()) == conns["opened"]
    assert conns["proxy_end_reasons"]
    b = doc["bytes"]
    assert b["relayed_up"] > 0
    assert b["relayed_down"] > 0
    assert 0 < b["verified"] <= b["expected"]

    reloads = doc["reloads"]
    assert reloads["good_writes"] > 0
    assert reloads["applied"] == reloads["good_writes"]
    assert reloads["rejected"] >= reloads["bad_writes"]
    assert doc["backends"]["kills"] + doc["backends"]["terms"] > 0

    res = doc["resources"]
    assert res["columns"][:4] == ["t_s", "rss_kib", "fds", "open_connections"]
    assert len(res["samples"]) >= 10
    for row in res["samples"]:
        assert len(row) == len(res["columns"])
        assert row[1] > 0
        assert row[2] > 0
    summary = res["summary"]
    assert summary["rss_kib"]["start_at_rest"] > 0
    assert summary["fds"]["start_at_rest"] > 0
    assert summary["fds"]["end_at_rest"] > 0

    names = {c["name"] for c in doc["checks"]}
    for name in CHECKS:
        assert name in names, name
    for check in doc["checks"]:
        assert isinstance(check["ok"], bool)
        assert isinstance(check["gating"], bool)
    assert isinstance(doc["verdict"]["pass"], bool)
    assert doc["verdict"]["pass"] == all(c["ok"] for c in doc["checks"] if c["gating"])

    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdict:" in output
