"""Who closed what, and was it allowed to: the proxy's log joined with the clients' records.

Pure: the soak hands over what it saw (client records, backend kills, the configs it wrote
and when the proxy confirmed them) and the proxy's JSON log lines; this module decides, for
every connection, the cause of its end and whether that cause was legitimate.

A close is legitimate when the client finished (everything it sent verified back or
acknowledged), when the client reset it on purpose, when the backend process it was pinned
to was killed or restarted meanwhile, or when the proxy closed it for drain deadline, idle
timeout or shutdown *and* that was due: the backend had been removed `drain_timeout` before,
the connection had been silent for `idle_timeout`, the proxy had been told to stop. Anything
else is an unexpected close, and bytes it did not deliver are lost bytes.

The hostile kinds (clients.HOSTILE_VARIANTS) each have one right outcome, which the client
and the access log must both show (`_hostile_cause`): a slow reader is never closed as idle
while bytes were moving, a stalled one is closed by the idle timeout with a reset, an early
reply arrives whole before the backend's reset, a reset after a half-close is noticed and
passed on (end `client_reset` / `backend_reset`, not a connection left until its idle
timeout).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from soaklib.clients import (
    CLIENT_RESET,
    EXPECTED_RESET,
    HOSTILE_VARIANTS,
    OK,
    REFUSED,
    TIMEOUT,
    ConnRecord,
)
from soaklib.routes import RouteSpec

# Proxy-side end reasons (tcpproxy.relay) that the proxy may cause on its own.
DRAIN_DEADLINE = "drain_deadline"
IDLE_TIMEOUT = "idle_timeout"
SHUTDOWN = "shutdown"
# Slack for comparing our clock readings with the proxy's decisions, seconds.
DEADLINE_SLACK_S = 0.5
KILL_SLACK_S = 0.2
JOIN_SLACK_S = 2.0
# The proxy closes drained connections over this window after the deadline (listener.py).
DRAIN_WINDOW_S = 1.0
# A client looking for its own access-log line: a line of a connection opened this long
# before the client started is not its own (the same port, reused).
OWN_LINE_SLACK_S = 0.25

EXPECTED_CAUSES = (
    "completed",
    "client_reset",
    "backend_killed",
    DRAIN_DEADLINE,
    IDLE_TIMEOUT,
    SHUTDOWN,
    "listener_not_serving",
    "expected_reset",
)
# Causes that mean a hostile connection went exactly right (others may be legitimate too).
HOSTILE_PASSES = frozenset({"completed", "expected_reset", "client_reset"})


@dataclass(frozen=True)
class AccessEntry:
    listener: str
    backend: str | None
    client: str
    bytes_up: int
    bytes_down: int
    duration_s: float
    end: str
    closed_wall: float  # Unix time of the log line

    @property
    def opened_wall(self) -> float:
        return self.closed_wall - self.duration_s


@dataclass
class ProxyLog:
    """The proxy's stderr (JSON lines), fed as it grows."""

    access: list[AccessEntry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # ERROR+ lines that are not rejections
    rejections: int = 0  # "config rejected" lines (one per problem)
    applied: int = 0  # "config applied" lines
    connect_failures: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    ejections: Counter[str] = field(default_factory=Counter)  # listener/backend -> times
    # (listener, client address) -> its lines: the same address:port can be a client of
    # two listeners at once (a source port is only unique per destination).
    by_client: dict[tuple[str, str], list[AccessEntry]] = field(default_factory=dict)
    lines: int = 0
    _partial: str = ""

    def ended(
        self, listener: str, client: str, since_wall: float, closed_after_wall: float | None = None
    ) -> str | None:
        """The end reason of the connection from `client` to `listener` opened after
        `since_wall` (Unix time), once its line is in; None before. `closed_after_wall`: only
        a line logged after then is it, for a connection that knows it was open then (the
        line of an earlier connection from the same port, reused, can fall inside the slack)."""
        for e in reversed(self.by_client.get((listener, client), ())):
            if closed_after_wall is not None and e.closed_wall < closed_after_wall:
                continue
            if e.opened_wall >= since_wall - OWN_LINE_SLACK_S:
                return e.end
        return None

    def feed(self, text: str) -> None:
        text = self._partial + text
        *complete, self._partial = text.split("\n")
        for line in complete:
            self.line(line)

    def finish(self) -> None:
        if self._partial.strip():
            self.line(self._partial)
        self._partial = ""

    def line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        self.lines += 1
        try:
            doc = json.loads(line)
        except ValueError:
            # A traceback or anything else printed outside the logger.
            self.errors.append(f"non-JSON output: {line[:300]}")
            return
        if not isinstance(doc, dict):
            self.errors.append(f"non-object JSON: {line[:300]}")
            return
        severity = str(doc.get("severity", ""))
        message = str(doc.get("message", ""))
        if doc.get("logger") == "tcpproxy.access":
            entry = AccessEntry(
                listener=str(doc["listener"]),
                backend=doc.get("backend"),
                client=str(doc["client"]),
                bytes_up=int(doc["bytes_up"]),
                bytes_down=int(doc["bytes_down"]),
                duration_s=float(doc["duration_s"]),
                end=str(doc["end"]),
                closed_wall=datetime.fromisoformat(str(doc["time"])).timestamp(),
            )
            self.access.append(entry)
            self.by_client.setdefault((entry.listener, entry.client), []).append(entry)
            return
        if message.startswith("config rejected"):
            self.rejections += 1
        elif message.startswith("config applied"):
            self.applied += 1
        elif severity in ("ERROR", "CRITICAL"):
            extra = f" | {doc['exception'][-600:]}" if "exception" in doc else ""
            self.errors.append(f"{severity} {doc.get('logger')}: {message[:300]}{extra}")
        elif severity == "WARNING":
            if message.startswith("connect to "):
                self.connect_failures[str(doc.get("reason", "?"))] += 1
            elif doc.get("health") == "ejected":
                self.ejections[f"{doc.get('listener')}/{doc.get('backend')}"] += 1
            else:
                self.warnings[message[:120]] += 1


@dataclass(frozen=True)
class BackendEvent:
    t: float  # monotonic
    name: str
    gen: int
    kind: str  # kill (SIGKILL) or term (SIGTERM, graceful restart)


@dataclass(frozen=True)
class Applied:
    """A good config the soak wrote, and when the proxy was seen serving it."""

    t_write: float
    t_confirmed: float
    spec: RouteSpec


@dataclass(frozen=True)
class PortEvent:
    t: float
    port: int
    serving: bool  # False from when we wrote a config without it; True once confirmed


@dataclass(frozen=True)
class Facts:
    records: Sequence[ConnRecord]
    log: ProxyLog
    kills: Sequence[BackendEvent]
    applied: Sequence[Applied]
    ports: Sequence[PortEvent]
    t_sigterm: float | None
    wall_offset: float  # Unix time = monotonic + wall_offset
    t0: float  # the soak's start (monotonic): times in the report are relative to it


@dataclass
class Verdicts:
    causes: Counter[str] = field(default_factory=Counter)
    causes_by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    proxy_ends: Counter[str] = field(default_factory=Counter)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    lost_bytes: int = 0
    corrupted_bytes: int = 0
    verified_bytes: int = 0
    expected_bytes: int = 0
    broken_in_flight_bytes: int = 0  # not delivered on legitimately broken connections
    byte_mismatches: list[dict[str, Any]] = field(default_factory=list)
    misrouted: list[dict[str, Any]] = field(default_factory=list)
    unmatched_log_lines: list[dict[str, Any]] = field(default_factory=list)
    lines_without_client_address: int = 0
    relayed_up: int = 0
    relayed_down: int = 0
    # Hostile kinds: "kind.variant@listener" -> causes
    hostile: dict[str, Counter[str]] = field(default_factory=dict)


def _removals(
    applied: Sequence[Applied], listener: str, backend: str
) -> list[tuple[float, float, float]]:
    """(removal written, re-add confirmed or inf, drain_timeout) for a listener's backend."""
    out: list[tuple[float, float, float]] = []
    start: float | None = None
    drain = 0.0
    prev_has = False
    for a in applied:
        lst = a.spec.get(listener)
        has = lst is not None and backend in lst.names()
        if prev_has and not has:
            start = a.t_write
        if has and start is not None:
            out.append((start, a.t_confirmed, drain))
            start = None
        if lst is not None:
            drain = lst.drain_timeout_s
        prev_has = has
    if start is not None:
        out.append((start, float("inf"), drain))
    return out


def _not_serving(ports: Sequence[PortEvent], port: int, t0: float, t1: float) -> bool:
    """Was `port` (as far as we knew) not serving at some moment of [t0, t1]?"""
    serving = False
    for ev in ports:
        if ev.port != port or ev.t < t0:
            if ev.port == port:
                serving = ev.serving
            continue
        if ev.t > t1:
            break
        if not serving or not ev.serving:
            return True
        serving = ev.serving
    return not serving


def _config_at(applied: Sequence[Applied], t0: float, t1: float) -> RouteSpec | None:
    """The config surely in force for all of [t0, t1], or None across a change."""
    for i, a in enumerate(applied):
        nxt = applied[i + 1].t_write if i + 1 < len(applied) else float("inf")
        if a.t_confirmed <= t0 and t1 < nxt:
            return a.spec
    return None


def _join(facts: Facts) -> dict[int, AccessEntry]:
    """Each client record's access-log line: same listener and client address, and opened and closed
    within the record's lifetime (a port is reused only after its last connection ended)."""
    by_client: dict[tuple[str, str], list[AccessEntry]] = {}
    for e in facts.log.access:
        by_client.setdefault((e.listener, e.client), []).append(e)
    used: set[int] = set()
    out: dict[int, AccessEntry] = {}
    off = facts.wall_offset
    for rec in sorted(facts.records, key=lambda r: r.t_start):
        if rec.client is None:
            continue
        start, end = rec.t_start + off, rec.t_end + off
        best: AccessEntry | None = None
        for e in by_client.get((rec.listener, rec.client), ()):
            if id(e) in used:
                continue
            inside = start - JOIN_SLACK_S <= e.opened_wall <= end + JOIN_SLACK_S
            closer = best is None or abs(e.opened_wall - start) < abs(best.opened_wall - start)
            if inside and e.closed_wall >= start - JOIN_SLACK_S and closer:
                best = e
        if best is not None:
            used.add(id(best))
            out[rec.id] = best
    # Lines without a client address (the proxy could not learn it: a client that reset at
    # once) go to an unmatched client that reset at once on the same listener, by time.
    resets = [
        r for r in facts.records if r.id not in out and r.intended_reset and r.client is not None
    ]
    for e in facts.log.access:
        if id(e) in used or has_address(e):
            continue
        for rec in resets:
            start, end = rec.t_start + off, rec.t_end + off
            if (
                rec.id not in out
                and rec.listener == e.listener
                and start - JOIN_SLACK_S <= e.opened_wall <= end + JOIN_SLACK_S
            ):
                used.add(id(e))
                out[rec.id] = e
                break
    return out


def has_address(e: AccessEntry) -> bool:
    host, _, port = e.client.rpartition(":")
    return bool(host) and port.isdigit()


def _killed(facts: Facts, rec: ConnRecord, entry: AccessEntry | None) -> bool:
    name = rec.backend or (entry.backend if entry else None)
    for k in facts.kills:
        if not rec.t_start - KILL_SLACK_S <= k.t <= rec.t_end + KILL_SLACK_S:
            continue
        if name is None or (k.name == name and (rec.gen is None or k.gen == rec.gen)):
            return True
    return False


def _idle_timeout(facts: Facts, listener: str, t: float) -> float:
    """The listener's idle timeout in the last config written before `t` (0: none)."""
    lst = None
    for a in facts.applied:
        if a.t_write <= t:
            lst = a.spec.get(listener) or lst
    return lst.idle_timeout_s if lst is not None else 0.0


def _silent(rec: ConnRecord, t_close: float, idle: float) -> bool:
    """Had no byte moved either way, as the client saw it, for the idle timeout when the
    proxy closed the connection as idle? (After its end the client moves nothing.)"""
    if idle <= 0:
        return False
    spans = [*rec.silences, (rec.last_activity, float("inf"))]
    return any(
        t_close - start >= idle - DEADLINE_SLACK_S and end >= t_close - DEADLINE_SLACK_S
        for start, end in spans
    )


def _hostile_cause(facts: Facts, rec: ConnRecord, entry: AccessEntry | None) -> tuple[str, bool]:
    """A hostile kind's one right outcome: the client saw `want_outcome` and the proxy logged
    `want_end` (any end, when None, but an idle close of a client that was not silent). Their
    backends are never killed: nothing else is legitimate, but an idle close of a client that
    did fall silent (a starved machine) when no end was prescribed."""
    end = entry.end if entry is not None else None
    if rec.outcome == REFUSED:
        return "refused_while_serving", False
    t_close = entry.closed_wall - facts.wall_offset if entry is not None else rec.t_end
    silent = end == IDLE_TIMEOUT and _silent(
        rec, t_close, _idle_timeout(facts, rec.listener, t_close)
    )
    if end == IDLE_TIMEOUT and not silent:
        return "idle_close_while_active", False
    if rec.outcome == rec.want_outcome and end is not None and rec.want_end in (None, end):
        return {EXPECTED_RESET: "expected_reset", CLIENT_RESET: "client_reset"}.get(
            rec.outcome, "completed"
        ), True
    if rec.outcome == rec.want_outcome:
        return f"end_{end or 'no_log_line'}_not_{rec.want_end or 'logged'}", False
    if silent and rec.want_end is None:
        return IDLE_TIMEOUT, True
    if rec.problem:
        return rec.problem, False
    return f"unexpected:{end or 'no_log_line'}/{rec.outcome}", False


def _cause(facts: Facts, rec: ConnRecord, entry: AccessEntry | None) -> tuple[str, bool]:
    """(cause, legitimate) of one connection's end."""
    if rec.corrupted:
        return "corrupted", False
    if rec.kind in HOSTILE_VARIANTS:
        return _hostile_cause(facts, rec, entry)
    if rec.outcome == OK:
        return "completed", True
    if rec.outcome == CLIENT_RESET and rec.intended_reset:
        return "client_reset", True
    if rec.outcome == REFUSED:
        if _not_serving(facts.ports, rec.port, rec.t_start, rec.t_end):
            return "listener_not_serving", True
        return "refused_while_serving", False
    end = entry.end if entry is not None else None
    t_close = entry.closed_wall - facts.wall_offset if entry is not None else rec.t_end
    if end == DRAIN_DEADLINE:
        backend = entry.backend if entry is not None else None
        for start, readded, drain in _removals(facts.applied, rec.listener, backend or ""):
            if (
                start + drain - DEADLINE_SLACK_S
                <= t_close
                <= readded + DRAIN_WINDOW_S + DEADLINE_SLACK_S
            ):
                return DRAIN_DEADLINE, True
        return "premature_drain_close", False
    if end == IDLE_TIMEOUT:
        idle = _idle_timeout(facts, rec.listener, t_close)
        if idle > 0 and t_close - rec.last_activity >= idle - DEADLINE_SLACK_S:
            return IDLE_TIMEOUT, True
        return "premature_idle_close", False
    if end == SHUTDOWN:
        if facts.t_sigterm is not None and t_close >= facts.t_sigterm - KILL_SLACK_S:
            return SHUTDOWN, True
        return "shutdown_before_sigterm", False
    if _killed(facts, rec, entry):
        return "backend_killed", True
    if entry is None and _not_serving(facts.ports, rec.port, rec.t_start, rec.t_end):
        # Accepted by the kernel into the backlog of a listening socket the proxy closed
        # (listener removed or moved) before accepting it: reset, never seen by the proxy.
        return "listener_not_serving", True
    if rec.expect_close == "idle_timeout" and rec.outcome == TIMEOUT:
        return "idle_timeout_not_enforced", False
    if rec.expect_close == "shutdown" and rec.outcome == TIMEOUT:
        return "not_closed_at_shutdown", False
    return f"unexpected:{end or 'no_log_line'}/{rec.outcome}", False


def classify(facts: Facts) -> Verdicts:
    v = Verdicts()
    joined = _join(facts)
    for e in facts.log.access:
        v.lines_without_client_address += not has_address(e)
        v.proxy_ends[e.end] += 1
        v.relayed_up += e.bytes_up
        v.relayed_down += e.bytes_down
    matched = {id(e) for e in joined.values()}
    for e in facts.log.access:
        if id(e) not in matched:
            v.unmatched_log_lines.append(
                {"client": e.client, "end": e.end, "listener": e.listener, "backend": e.backend}
            )
    off = facts.wall_offset
    for rec in facts.records:
        entry = joined.get(rec.id)
        cause, legitimate = _cause(facts, rec, entry)
        v.causes[cause] += 1
        v.causes_by_kind.setdefault(rec.kind, Counter())[cause] += 1
        v.outcomes[rec.outcome] += 1
        v.corrupted_bytes += rec.corrupted
        v.verified_bytes += rec.verified
        v.expected_bytes += rec.expected
        short = max(0, rec.expected - rec.verified)
        if legitimate:
            v.broken_in_flight_bytes += short
        else:
            v.lost_bytes += short
            v.unexpected.append(
                {
                    "cause": cause,
                    "proxy_end": entry.end if entry else None,
                    "proxy_bytes_up": entry.bytes_up if entry else None,
                    "proxy_bytes_down": entry.bytes_down if entry else None,
                    "lost_bytes": short,
                    **rec.to_json(facts.t0),
                }
            )
        if rec.kind in HOSTILE_VARIANTS:
            key = f"{rec.kind}.{rec.variant}@{rec.listener}"
            v.hostile.setdefault(key, Counter())[cause] += 1
            if cause in HOSTILE_PASSES:
                _check_hostile_counts(v, rec, entry)
        elif cause == "completed":
            _check_counts(v, rec, entry)
        if rec.backend is not None and rec.t_greeting is not None:
            spec = _config_at(facts.applied, rec.t_start, rec.t_greeting)
            lst = spec.get(rec.listener) if spec is not None else None
            if lst is not None and rec.backend not in lst.eligible():
                v.misrouted.append(
                    {
                        "id": rec.id,
                        "listener": rec.listener,
                        "backend": rec.backend,
                        "eligible": sorted(lst.eligible()),
                        "t_start_wall": round(rec.t_start + off, 3),
                    }
                )
    return v


def _check_counts(v: Verdicts, rec: ConnRecord, entry: AccessEntry | None) -> None:
    """A completed connection: the proxy must have logged it, with the bytes the client
    wrote and read."""
    if entry is None:
        v.unmatched_log_lines.append({"client": rec.client, "end": None, "id": rec.id})
    elif (entry.bytes_up, entry.bytes_down) != (rec.up, rec.down):
        v.byte_mismatches.append(
            {
                "id": rec.id,
                "kind": rec.kind,
                "client_up": rec.up,
                "client_down": rec.down,
                "proxy_up": entry.bytes_up,
                "proxy_down": entry.bytes_down,
            }
        )


def _check_hostile_counts(v: Verdicts, rec: ConnRecord, entry: AccessEntry | None) -> None:
    """A hostile connection that went right: the bytes that had to get through did, by the
    proxy's count too. Both ways for a slow reader; down (every byte read from the backend
    reached the client) after a backend's reset; up (the client's last bytes were read, to be
    delivered) after the client's. A stalled reader's reset discards bytes on purpose."""
    if entry is None:
        v.unmatched_log_lines.append({"client": rec.client, "end": None, "id": rec.id})
        return
    if rec.variant == "stall":
        return
    up_due = rec.want_outcome in (OK, CLIENT_RESET)
    down_due = rec.want_outcome in (OK, EXPECTED_RESET)
    if (up_due and entry.bytes_up != rec.up) or (down_due and entry.bytes_down != rec.down):
        v.byte_mismatches.append(
            {
                "id": rec.id,
                "kind": f"{rec.kind}.{rec.variant}",
                "client_up": rec.up,
                "client_down": rec.down,
                "proxy_up": entry.bytes_up,
                "proxy_down": entry.bytes_down,
            }
        )


def counts(items: Iterable[str]) -> dict[str, int]:
    return dict(Counter(items).most_common())
