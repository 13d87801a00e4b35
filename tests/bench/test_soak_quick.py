"""The soak test, `--quick`: a minute of mixed traffic and churn through a real proxy process
must lose no byte, close nothing unexpectedly, and leave a well-formed report. And the
ledger's rules for the hostile patterns, on hand-made records (fast, no process)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "benchmarks" / "soak.py"
RUN_TIMEOUT_S = 240

sys.path.insert(0, str(ROOT / "benchmarks"))
import soak  # noqa: E402
from soaklib.clients import (  # noqa: E402
    CLIENT_RESET,
    EARLY_EOF,
    EXPECTED_RESET,
    HOSTILE_VARIANTS,
    OK,
    ConnRecord,
)
from soaklib.ledger import AccessEntry, Applied, Facts, ProxyLog, classify  # noqa: E402
from soaklib.routes import TIGHT, ListenerSpec, RouteSpec  # noqa: E402

KINDS = ("stream", "bulk", "request", "slow", "reset", "idle", "shutdown", *HOSTILE_VARIANTS)
CHECKS = (
    "lost bytes",
    "corrupted bytes",
    "unexpected closes",
    *(name for name, _, _ in soak.HOSTILE_CHECKS),
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

    for kind, variants in HOSTILE_VARIANTS.items():
        for variant in variants:
            for listener in TIGHT:
                assert doc["hostile"].get(f"{kind}.{variant}@{listener}"), (kind, variant)

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


# -- the ledger's hostile rules, on hand-made records ------------------------------------------

WALL = 1_000_000.0  # Unix time = monotonic + WALL
IDLE_S = 2.0


def _facts(*pairs: tuple[ConnRecord, AccessEntry | None]) -> Facts:
    log = ProxyLog()
    log.access = [e for _, e in pairs if e is not None]
    spec = RouteSpec((ListenerSpec(TIGHT[0], 1, (("h1", 1), ("h2", 1)), 3, IDLE_S),))
    return Facts(
        records=[r for r, _ in pairs],
        log=log,
        kills=(),
        applied=(Applied(0.0, 0.0, spec),),
        ports=(),
        t_sigterm=None,
        wall_offset=WALL,
        t0=0.0,
    )


def _record(kind: str, variant: str, outcome: str, **fields: Any) -> ConnRecord:
    rec = ConnRecord(1, kind, TIGHT[0], 1, t_start=10.0, t_end=20.0, client="127.0.0.1:5000")
    rec.variant, rec.outcome, rec.backend = variant, outcome, "h1"
    rec.last_activity = rec.t_end
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


def _line(rec: ConnRecord, end: str, t_close: float, up: int = 0, down: int = 0) -> AccessEntry:
    return AccessEntry(
        TIGHT[0], "h1", rec.client or "", up, down, t_close - 10.1, end, t_close + WALL
    )


def _cause(rec: ConnRecord, entry: AccessEntry | None) -> tuple[str, int]:
    v = classify(_facts((rec, entry)))
    ((cause, _),) = v.causes.items()
    return cause, len(v.byte_mismatches)


def test_slow_reader_closed_as_idle_while_reading_is_a_failure() -> None:
    # It got every byte (the kernel delivered them after the FIN) but it was reading.
    rec = _record("slowidle", "reading", OK, want_outcome=OK, up=20, down=100)
    assert _cause(rec, _line(rec, "idle_timeout", 14.0, 20, 100)) == ("idle_close_while_active", 0)
    assert _cause(rec, _line(rec, "backend_closed", 20.0, 20, 100)) == ("completed", 0)
    assert _cause(rec, _line(rec, "backend_closed", 20.0, 20, 99)) == ("completed", 1)
    # Silent for the idle timeout (a starved client): then the close was due.
    rec.silences = [(11.0, 14.5)]
    assert _cause(rec, _line(rec, "idle_timeout", 14.0, 20, 100)) == ("completed", 0)
    rec.outcome = EARLY_EOF
    assert _cause(rec, _line(rec, "idle_timeout", 14.0, 20, 100)) == ("idle_timeout", 0)


def test_stalled_reader_must_be_reset_by_the_idle_timeout() -> None:
    fields: dict[str, Any] = {
        "want_end": "idle_timeout",
        "want_outcome": EXPECTED_RESET,
        "silences": [(11.0, 14.0)],
    }
    rec = _record("slowidle", "stall", EXPECTED_RESET, **fields)
    assert _cause(rec, _line(rec, "idle_timeout", 13.5)) == ("expected_reset", 0)
    rec = _record("slowidle", "stall", EARLY_EOF, problem="idle_close_by_eof", **fields)
    assert _cause(rec, _line(rec, "idle_timeout", 13.5))[0] == "idle_close_by_eof"
    rec = _record("slowidle", "stall", EXPECTED_RESET, **fields)
    assert _cause(rec, _line(rec, "idle_timeout", 12.0))[0] == "idle_close_while_active"


def test_resets_after_half_close_must_be_noticed() -> None:
    rec = _record("hcreset", "client_now", CLIENT_RESET, want_end="client_reset", up=50)
    rec.want_outcome = CLIENT_RESET
    assert _cause(rec, _line(rec, "client_reset", 20.0, up=50)) == ("client_reset", 0)
    assert _cause(rec, _line(rec, "client_reset", 20.0, up=40)) == ("client_reset", 1)
    # Left in the proxy until its idle timeout: the client is gone, so that close was "due",
    # but the end is wrong.
    got = _cause(rec, _line(rec, "idle_timeout", 22.5, up=50))
    assert got == ("end_idle_timeout_not_client_reset", 0)
    rec = _record("hcreset", "backend", EARLY_EOF, want_end="backend_reset")
    rec.want_outcome, rec.problem = EXPECTED_RESET, "reset_not_passed_on"
    assert _cause(rec, _line(rec, "idle_timeout", 22.5))[0] == "reset_not_passed_on"


def test_hostile_checks_need_every_variant_right_on_every_listener() -> None:
    recs = []
    for i, (variant, listener) in enumerate(
        (v, lst) for v in HOSTILE_VARIANTS["early"] for lst in TIGHT
    ):
        rec = _record("early", variant, EXPECTED_RESET, want_end="backend_reset")
        rec.id, rec.listener, rec.want_outcome = i + 1, listener, EXPECTED_RESET
        rec.client = f"127.0.0.1:{5000 + i}"
        recs.append(rec)
    lines = [
        AccessEntry(r.listener, "h1", r.client or "", 0, 0, 1.0, "backend_reset", 20.0 + WALL)
        for r in recs
    ]
    facts = _facts(*zip(recs, lines, strict=True))
    checks = {c.name: c for c in soak.hostile_checks(classify(facts))}
    early = next(name for name, kind, _ in soak.HOSTILE_CHECKS if kind == "early")
    assert checks[early].ok, checks[early]
    slow = next(name for name, kind, _ in soak.HOSTILE_CHECKS if kind == "slowidle")
    assert not checks[slow].ok  # never ran: proves nothing
    recs[0].outcome, recs[0].problem = "reset", "reply_cut_by_reset"
    check = {c.name: c for c in soak.hostile_checks(classify(facts))}[early]
    assert not check.ok
    assert check.value == f"1 failed of {len(recs)}"
    assert Counter(classify(facts).causes)["reply_cut_by_reset"] == 1
