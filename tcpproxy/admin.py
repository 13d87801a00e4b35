"""Admin HTTP server: metrics, probes, status (JSON and HTML), reload and
rollout control. Who may change state: admin_access.py; its connections: admin_server.py."""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from tcpproxy import __version__
from tcpproxy.admin_access import (
    READ_ONLY_METHODS,
    ControlPolicy,
    Refusal,
    check_control,
    is_loopback,
)
from tcpproxy.admin_server import AdminSite, Connections, LogQuota, format_peer, listening_socket
from tcpproxy.config import split_host_port
from tcpproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tcpproxy.proxy import Proxy
from tcpproxy.settings import (
    DEFAULT_ADMIN_MAX_CONNECTIONS,
    DEFAULT_ADMIN_READ_TIMEOUT_S,
    Settings,
    read_admin_token,
)

log = logging.getLogger("tcpproxy")

PAGE_REFRESH_S = 2
# A control request needs no body; a JSON one is accepted (and ignored) up to this size.
CONTROL_BODY_MAX_BYTES = 4096
PROXY_KEY = web.AppKey("proxy", Proxy)


@dataclass(frozen=True)
class AdminOptions:
    """The admin server's settings (see settings.py for what each one means)."""

    token: str | None = None
    token_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    read_timeout: float = DEFAULT_ADMIN_READ_TIMEOUT_S
    max_connections: int = DEFAULT_ADMIN_MAX_CONNECTIONS

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminOptions:
        token = settings.admin_token
        return cls(
            token=token.get_secret_value() if token is not None else None,
            token_file=settings.admin_token_file,
            allowed_hosts=settings.admin_allowed_hosts,
            read_timeout=settings.admin_read_timeout,
            max_connections=settings.admin_max_connections,
        )


@dataclass
class _Control:
    """What the middleware needs: the policy, where the token comes from, the connections."""

    policy: ControlPolicy
    options: AdminOptions
    conns: Connections
    refusals: LogQuota

    def token(self) -> str | None:
        """The current token: a token file is read again each time, so that a rotated
        Kubernetes Secret applies without a restart. ValueError if it cannot be read."""
        if self.options.token_file is not None:
            return read_admin_token(self.options.token_file)
        return self.options.token


CONTROL_KEY = web.AppKey("control", _Control)
# Live figures: a cached copy would be a wrong one.
_NO_STORE = {"Cache-Control": "no-store"}


def status(proxy: Proxy) -> dict[str, Any]:
    """Everything /status and the HTML page show, as plain JSON-able data."""
    loop_now = asyncio.get_running_loop().time()
    wall_now = time.time()
    listeners = []
    for listener in proxy.all_listeners():
        weight_of = listener.effective_weight
        configured = sum(weight_of(b) for b in listener.backends.values() if b.eligible())
        backends = []
        for b in listener.all_backends():
            left = (
                None
                if b.drain_deadline is None
                else round(max(0.0, b.drain_deadline - loop_now), 1)  # 58.7, not 58.6799999
            )
            backends.append(
                {
                    "name": b.name,
                    "address": b.address,
                    "weight": b.weight,
                    # What new connections follow: the weight, or the rollout's step.
                    "effective_weight": weight_of(b),
                    "share": (weight_of(b) / configured) if b.eligible() and configured else 0.0,
                    "state": b.state,
                    # Why a backend is `unhealthy`: failing active checks, or ejected for a
                    # while after failed connects.
                    "healthy": b.healthy,
                    "ejected": b.ejected,
                    "active_connections": len(b.connections),
                    "total_connections": b.total,
                    "bytes_upstream": b.bytes_up(),
                    "bytes_downstream": b.bytes_down(),
                    "connect_failures": dict(b.connect_failures),
                    "drain_closed": b.drain_closed,
                    "drain_deadline": None if left is None else wall_now + left,
                    "drain_seconds_left": left,
                }
            )
        listeners.append(
            {
                "name": listener.name,
                "bind": listener.config.bind,
                "state": "removed" if listener.retired else "serving",
                "balance": listener.config.balance,
                "open_connections": listener.open_connections,
                "backends": backends,
                "rollout": listener.rollout.as_dict(wall_now) if listener.rollout else None,
                "history": listener.share_history(),
            }
        )
    applied = proxy.applied
    return {
        "version": __version__,
        "config_path": str(proxy.config_path),
        "sha256": applied.sha256 if applied else None,
        "loaded_at": proxy.loaded_at,
        "ready": proxy.ready,
        "last_reload": proxy.last_reload.as_dict() if proxy.last_reload else None,
        "last_error": list(proxy.last_failure.problems) if proxy.last_failure else [],
        "listeners": listeners,
    }


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _fmt_span(seconds: float) -> str:
    """42s, 4m 02s, 1h 05m: the same as fmtSpan in the page's script."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _fmt_time(unix: float | None, now: float) -> str:
    if unix is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
    return f"{stamp} ({_fmt_span(now - unix)} ago)"


# Share-bar colours, one per backend in config order; no red or green, which mean state.
_PALETTE = ("#3b6fd4", "#e08a1e", "#7a4fc4", "#1a9aa6", "#c2478f", "#7d8f2a", "#8c5a3c", "#555")
_NO_JS_REFRESH = f'<noscript><meta http-equiv="refresh" content="{PAGE_REFRESH_S}"></noscript>'

_STYLE = """
:root { --fg: #1d2330; --muted: #667085; --line: #e3e6ec; --card: #fff; --bg: #f4f6f9;
  --ok: #1a7f37; --warn: #b35c00; --bad: #c62828; --off: #7b8494; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
  color: var(--fg); background: var(--bg); }
header, main > section, .stale { margin: 16px 24px; }
h1 { font-size: 20px; margin: 0 0 6px; } h1 small { color: var(--muted); font-weight: 400; }
h2 { font-size: 17px; margin: 0; display: inline; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, monospace; }
.meta { color: var(--muted); } .meta b { color: var(--fg); font-weight: 500; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; overflow-x: auto; }
.card > .head { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; }
.pill { display: inline-block; padding: 1px 9px; border-radius: 10px; color: #fff;
  font-size: 12px; font-weight: 600; letter-spacing: .02em; }
.s-active, .s-serving, .s-ready, .s-success, .s-running, .s-completed { background: var(--ok); }
.s-zero, .s-unchanged, .s-removed { background: var(--off); }
.s-draining, .s-paused { background: var(--warn); }
.s-unhealthy, .s-failure, .s-not-ready, .s-aborted { background: var(--bad); }
.rollout { margin: 8px 0; } .chart { margin: 8px 0; } .chart figcaption { color: var(--muted);
  font-size: 12px; }
.sharebar { display: flex; height: 26px; border-radius: 5px; overflow: hidden; margin: 12px 0;
  background: var(--line); }
.sharebar .seg { color: #fff; font-size: 12px; font-weight: 600; line-height: 26px;
  padding: 0 8px; white-space: nowrap; overflow: hidden; text-overflow: clip; }
.sharebar .none, .sharebar .gone { color: var(--bad); font-weight: 600; line-height: 26px;
  padding: 0 10px; }
.sharebar .gone { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px;
  text-transform: uppercase; letter-spacing: .03em; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:last-child td { border-bottom: 0; }
tr.draining td, tr.zero td { color: var(--muted); } tr.draining td.name { color: var(--fg); }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 6px; }
.mini { display: inline-block; width: 60px; height: 8px; background: var(--line);
  border-radius: 4px; vertical-align: middle; margin-right: 6px; overflow: hidden; }
.mini i { display: block; height: 100%; }
.left { color: var(--warn); font-weight: 600; margin-left: 2px; }
.why { color: var(--bad); margin-left: 2px; }
.bad { color: var(--bad); font-weight: 600; }
.errors { border-color: var(--bad); color: var(--bad); } .errors ul { margin: 4px 0 0; }
.stale { display: none; } .is-stale .stale { display: block; color: #fff; background: var(--bad);
  padding: 8px 14px; border-radius: 6px; }
footer { color: var(--muted); margin: 8px 24px 24px; font-size: 12px; }
"""

# Polls the page itself and swaps <main>, so there is one renderer (the server's), the scroll
# position survives, and a dead admin server shows as a banner instead of a browser error.
# Between polls it counts drain deadlines down.
_SCRIPT = """
(function () {
  var REFRESH_MS = __REFRESH_MS__, received = Date.now(), refreshes = 0;
  function fmtSpan(s) {
    s = Math.max(0, Math.floor(s));
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + two(Math.floor(s % 3600 / 60)) + "m";
    return Math.floor(s / 86400) + "d " + two(Math.floor(s % 86400 / 3600)) + "h";
  }
  function tick() {
    var spent = (Date.now() - received) / 1000;
    document.querySelectorAll("[data-left]").forEach(function (el) {
      el.textContent = fmtSpan(parseFloat(el.getAttribute("data-left")) - spent) + " left";
    });
  }
  function refresh() {
    fetch(location.pathname, { cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (text) {
      var fresh = new DOMParser().parseFromString(text, "text/html").querySelector("main");
      if (!fresh) throw new Error("no <main> in the answer");
      document.querySelector("main").replaceWith(fresh);
      received = Date.now();
      refreshes += 1;
      document.body.setAttribute("data-refreshes", String(refreshes));
      document.body.classList.remove("is-stale");
    }).catch(function (err) {
      document.getElementById("stale-why").textContent = String(err);
      document.body.classList.add("is-stale");
    }).then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  setInterval(tick, 1000);
  setTimeout(refresh, REFRESH_MS);
})();
""".replace("__REFRESH_MS__", str(PAGE_REFRESH_S * 1000))


def _pill(state: str, text: str | None = None) -> str:
    css = "s-" + state.replace(" ", "-")
    return f'<span class="pill {html.escape(css)}">{html.escape(text or state)}</span>'


CHART_W, CHART_H = 600, 90


def _share_chart(history: list[dict[str, Any]], colours: dict[str, str]) -> str:
    """Inline SVG: each backend's share of the new connections, per sampling interval."""
    points = [h for h in history if h["connections"]]
    if len(points) < 2:
        return ""
    t0, t1 = points[0]["at"], points[-1]["at"]
    span = max(t1 - t0, 1e-9)
    lines = []
    for name, colour in colours.items():
        coords = " ".join(
            f"{(h['at'] - t0) / span * CHART_W:.1f},"
            f"{CHART_H - h['share'].get(name, 0.0) * CHART_H:.1f}"
            for h in points
        )
        lines.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
    minutes = (t1 - t0) / 60
    return (
        f'<figure class="chart"><svg viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" '
        f'height="{CHART_H}" role="img" aria-label="share of new connections per backend">'
        f'<rect width="{CHART_W}" height="{CHART_H}" fill="none" stroke="#ccc"/>'
        f'<line x1="0" y1="{CHART_H / 2}" x2="{CHART_W}" y2="{CHART_H / 2}" stroke="#eee"/>'
        f"{''.join(lines)}</svg><figcaption>share of new connections per backend, last "
        f"{minutes:.1f} min (0-100%)</figcaption></figure>"
    )


def _render_rollout(rollout: dict[str, Any] | None) -> str:
    if not rollout:
        return ""
    esc = html.escape
    text = (
        f"rollout <b>{esc(rollout['from'])}</b> &rarr; <b>{esc(rollout['to'])}</b> "
        f"{_pill(rollout['state'])} step {rollout['step']}/{len(rollout['steps'])} "
        f"({', '.join(f'{s}%' for s in rollout['steps'])}) &middot; "
        f"<b>{rollout['share']}%</b> of new connections to {esc(rollout['to'])}"
    )
    if rollout.get("next_step_in_s") is not None:
        text += f" &middot; next step in {_fmt_span(rollout['next_step_in_s'])}"
    if rollout.get("reason"):
        text += f' &middot; <span class="bad">{esc(rollout["reason"])}</span>'
    return f'<div class="rollout">{text}</div>'


def _render_listener(lst: dict[str, Any]) -> str:
    esc = html.escape
    colours = {b["name"]: _PALETTE[i % len(_PALETTE)] for i, b in enumerate(lst["backends"])}
    segments = [
        f'<div class="seg" style="width:{100 * b["share"]:.3f}%;background:{colours[b["name"]]}"'
        f' title="{esc(b["name"])}: weight {b["weight"]}, {100 * b["share"]:.1f}%">'
        f"{esc(b['name'])} {100 * b['share']:.0f}%</div>"
        for b in lst["backends"]
        if b["share"] > 0
    ]
    if lst["state"] == "removed":
        segments = [
            '<div class="gone">removed from the config: the port is closed, open '
            "connections drain</div>"
        ]
    elif not segments:
        segments = ['<div class="none">no eligible backend: new connections are rejected</div>']
    rows = []
    for b in lst["backends"]:
        state = _pill(b["state"])
        if b["state"] == "unhealthy":
            why = "ejected" if b["ejected"] else "failing checks"
            state += f' <span class="why">{why}</span>'
        left = b["drain_seconds_left"]
        if left is not None:
            state += f' <span class="left" data-left="{left:.3f}">{_fmt_span(left)} left</span>'
        failures = b["connect_failures"]
        failed = sum(failures.values())
        failed_title = ", ".join(f"{reason} {n}" for reason, n in failures.items())
        colour = colours[b["name"]]
        share = 100 * b["share"]
        rows.append(
            f'<tr class="{esc(b["state"])}">'
            f'<td class="name"><span class="swatch" style="background:{colour}"></span>'
            f"<b>{esc(b['name'])}</b></td>"
            f"<td><code>{esc(b['address'])}</code></td>"
            f'<td class="n">{b["weight"]}</td>'
            f'<td class="n"><span class="mini"><i style="width:{share:.1f}%;'
            f'background:{colour}"></i></span>{share:.0f}%</td>'
            f"<td>{state}</td>"
            f'<td class="n">{b["active_connections"]}</td>'
            f'<td class="n">{b["total_connections"]}</td>'
            f'<td class="n" title="{b["bytes_upstream"]} bytes">'
            f"{_fmt_bytes(b['bytes_upstream'])}</td>"
            f'<td class="n" title="{b["bytes_downstream"]} bytes">'
            f"{_fmt_bytes(b['bytes_downstream'])}</td>"
            f'<td class="n{" bad" if failed else ""}" title="{esc(failed_title)}">{failed}</td>'
            f'<td class="n">{b["drain_closed"]}</td>'
            "</tr>"
        )
    return (
        f'<section class="card listener" id="listener-{esc(lst["name"])}"><div class="head">'
        f"<h2>{esc(lst['name'])}</h2><code>{esc(lst['bind'])}</code>{_pill(lst['state'])}"
        f'<span class="meta"><b>{lst["open_connections"]}</b> open connections</span></div>'
        f'<div class="sharebar" title="share of new connections by weight">{"".join(segments)}'
        f"</div>{_render_rollout(lst.get('rollout'))}"
        f"{_share_chart(lst.get('history', []), colours)}"
        "<table><thead><tr><th>backend</th><th>address</th>"
        '<th class="n">weight</th><th class="n">share</th><th>state</th>'
        '<th class="n">active</th><th class="n">total</th>'
        '<th class="n" title="client to backend">bytes up</th>'
        '<th class="n" title="backend to client">bytes down</th>'
        '<th class="n">connect failures</th><th class="n">drain-closed</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def render_page(data: dict[str, Any]) -> str:
    """The status page: everything in /status, laid out to be read at a glance."""
    esc = html.escape
    now = time.time()
    reload = data["last_reload"] or {}
    sha = data["sha256"] or "-"
    reload_line = "-"
    if reload:
        reload_line = (
            f"{_pill(reload['result'])} {esc(_fmt_time(reload['at'], now))}"
            f" &middot; trigger {esc(reload['trigger'])}"
        )
        if reload["sha256"]:
            reload_line += (
                f' &middot; sha256 <code title="{esc(reload["sha256"])}">'
                f"{esc(reload['sha256'][:12])}</code>"
            )
        if reload["summary"]:
            reload_line += f" &middot; {esc(reload['summary'])}"
    errors = ""
    if data["last_error"]:
        items = "".join(f"<li><code>{esc(p)}</code></li>" for p in data["last_error"])
        errors = (
            '<section class="card errors"><b>Last reload failed; the previous config keeps '
            f"serving:</b><ul>{items}</ul></section>"
        )
    ready = _pill("ready") if data["ready"] else _pill("not ready")
    listeners = "".join(_render_listener(lst) for lst in data["listeners"])
    if not listeners:
        listeners = '<section class="card">No listeners.</section>'
    generated = time.strftime("%H:%M:%S UTC", time.gmtime(now))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{_NO_JS_REFRESH}
<link rel="icon" href="data:,">
<title>tcpproxy status</title>
<style>{_STYLE}</style></head>
<body data-refreshes="0">
<div class="stale">Not updated: the admin server does not answer (<span id="stale-why"></span>).
The figures below are out of date.</div>
<main>
<header>
<h1>tcpproxy <small>{esc(data["version"])}</small> {ready}</h1>
<div class="meta">config <b><code>{esc(data["config_path"])}</code></b>
&middot; sha256 <code title="{esc(sha)}">{esc(sha[:12])}</code>
&middot; applied {esc(_fmt_time(data["loaded_at"], now))}</div>
<div class="meta">last reload: {reload_line}</div>
</header>
{errors}
{listeners}
<footer>Updated {generated}; refreshes every {PAGE_REFRESH_S} s.
Share is each backend's part of the weight of the backends that take new connections.
<a href="/status">JSON</a> &middot; <a href="/metrics">metrics</a></footer>
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def probe(proxy: Proxy, path: str) -> tuple[int, str] | None:
    """/livez and /readyz as (status, text); None for any other path."""
    if path == "/livez":
        return 200, "ok\n"
    if path == "/readyz":
        return (200, "ready\n") if proxy.ready else (503, "not ready\n")
    return None


async def _metrics(request: web.Request) -> web.Response:
    # Written off the event loop from a snapshot: a scrape of many backends does not hold
    # up the data plane.
    accept_gzip = "gzip" in request.headers.get(hdrs.ACCEPT_ENCODING, "")
    body, gzipped = await request.app[PROXY_KEY].metrics.exposition(accept_gzip)
    headers = {hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE}
    if gzipped:
        headers[hdrs.CONTENT_ENCODING] = "gzip"
    return web.Response(body=body, headers=headers)


async def _livez(request: web.Request) -> web.Response:
    status, text = probe(request.app[PROXY_KEY], "/livez") or (500, "")
    return web.Response(status=status, text=text)


async def _readyz(request: web.Request) -> web.Response:
    status, text = probe(request.app[PROXY_KEY], "/readyz") or (500, "")
    return web.Response(status=status, text=text)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status(request.app[PROXY_KEY]), headers=_NO_STORE)


async def _page(request: web.Request) -> web.Response:
    return web.Response(
        text=render_page(status(request.app[PROXY_KEY])),
        content_type="text/html",
        headers=_NO_STORE,
    )


def _peer(request: web.Request) -> str:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return format_peer(peer) if peer is not None else "an unknown address"


def _who(request: web.Request) -> str:
    """Who asked, as far as the server can tell: never "an operator" when it may be anyone
    who reached the port."""
    policy = request.app[CONTROL_KEY].policy
    how = "with the admin token" if policy.has_token else "without a token (loopback admin)"
    return f"an admin API request from {_peer(request)} {how}"


async def _rollout(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    name, action = request.match_info["listener"], request.match_info["action"]
    listener = proxy.listeners.get(name)
    if listener is None or listener.rollout is None:
        return web.json_response({"error": f"no rollout on listener {name!r}"}, status=404)
    done = listener.control_rollout(action, _who(request), _peer(request))
    rollout = listener.rollout.as_dict(time.time())
    # This replica only: a decision for every replica goes into the config file.
    body = {"done": done, "scope": "this replica", "rollout": rollout}
    return web.json_response(body, status=200 if done else 409)


async def _reload(request: web.Request) -> web.Response:
    log.info("config reload asked for by %s", _who(request), extra={"client": _peer(request)})
    result = await request.app[PROXY_KEY].reload("admin")
    return web.json_response(result.as_dict(), status=400 if result.result == "failure" else 200)


def _refuse(request: web.Request, refusal: Refusal) -> web.Response:
    control = request.app[CONTROL_KEY]
    held_back = control.refusals.take()
    if held_back is not None:
        log.warning(
            "admin API: refused %s %s from %s: %s%s",
            request.method,
            request.path,
            _peer(request),
            refusal.message,
            f" ({held_back} more refusals since the last such line)" if held_back else "",
            extra={"client": _peer(request), "reason": refusal.reason},
        )
    headers = {"Cache-Control": "no-store"}
    if refusal.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tcpproxy admin"'
    return web.json_response({"error": refusal.message}, status=refusal.status, headers=headers)


async def _check_request(request: web.Request) -> web.Response | None:
    """None when a state-changing request may go ahead, else the answer that refuses it."""
    control = request.app[CONTROL_KEY]
    headers = request.headers
    try:
        token = control.token() if control.policy.has_token else None
    except ValueError as exc:
        return _refuse(request, Refusal(503, "token", f"the admin token is unusable: {exc}"))
    refusal = check_control(
        control.policy,
        host=headers.get(hdrs.HOST),
        origin=headers.get(hdrs.ORIGIN),
        fetch_site=headers.get("Sec-Fetch-Site"),
        content_type=headers.get(hdrs.CONTENT_TYPE),
        has_body=request.body_exists,
        authorization=headers.get(hdrs.AUTHORIZATION),
        token=token,
    )
    if refusal is not None:
        return _refuse(request, refusal)
    if request.body_exists:
        # Read while the read deadline still runs: a body sent slowly is cut off by it.
        try:
            json.loads(await request.read() or b"{}")
        except web.HTTPRequestEntityTooLarge:
            return _refuse(request, Refusal(413, "body", "the request body is too large"))
        except ValueError:
            return _refuse(request, Refusal(400, "body", "the request body is not JSON"))
    return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    conns = request.app[CONTROL_KEY].conns
    try:
        if request.method not in READ_ONLY_METHODS:
            refused = await _check_request(request)
            if refused is not None:
                return refused
        # The whole request is in: it is answered with no deadline.
        conns.request_started(request.transport)
        return await handler(request)
    finally:
        conns.request_done(request.transport)  # the deadline for the next request


def make_app(proxy: Proxy, control: _Control) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=CONTROL_BODY_MAX_BYTES)
    app[PROXY_KEY] = proxy
    app[CONTROL_KEY] = control
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    app.router.add_get("/", _page)
    app.router.add_post("/-/reload", _reload)
    app.router.add_post("/rollout/{listener}/{action:pause|resume|abort}", _rollout)
    return app


async def start_admin(
    proxy: Proxy, address: str, options: AdminOptions | None = None
) -> web.AppRunner:
    """Serve the admin API on `address`; `runner.cleanup()` stops it."""
    options = options or AdminOptions()
    host, port = split_host_port(address)
    sock = listening_socket(host, port)
    try:
        bound = sock.getsockname()[0]
        policy = ControlPolicy(
            listen_host=host,
            # What it is bound to, not what the name says: "localhost" could be anything.
            loopback=is_loopback(bound),
            has_token=options.token is not None or options.token_file is not None,
            allowed_hosts=tuple(h.strip("[]").lower() for h in options.allowed_hosts),
        )
        conns = Connections(options.read_timeout, options.max_connections)
        control = _Control(policy, options, conns, LogQuota(lines=10, window_s=60.0))
        runner = web.AppRunner(make_app(proxy, control), access_log=None, handle_signals=False)
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    try:
        await AdminSite(runner, sock, conns, functools.partial(probe, proxy)).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    log.info("admin server on %s: %s", address, policy.describe())
    return runner
