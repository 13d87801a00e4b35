"""Admin HTTP server (DESIGN §5): metrics, probes, status (JSON and HTML) and reload."""

from __future__ import annotations

import asyncio
import html
import time
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from tcpproxy import __version__
from tcpproxy.config import split_host_port
from tcpproxy.proxy import Proxy

PAGE_REFRESH_S = 2
PROXY_KEY = web.AppKey("proxy", Proxy)


def status(proxy: Proxy) -> dict[str, Any]:
    """Everything /status and the HTML page show, as plain JSON-able data."""
    loop_now = asyncio.get_running_loop().time()
    wall_now = time.time()
    listeners = []
    for listener in proxy.all_listeners():
        configured = sum(b.weight for b in listener.backends.values() if b.eligible())
        backends = []
        for b in listener.all_backends():
            left = None if b.drain_deadline is None else max(0.0, b.drain_deadline - loop_now)
            backends.append(
                {
                    "name": b.name,
                    "address": b.address,
                    "weight": b.weight,
                    "share": (b.weight / configured) if b.eligible() and configured else 0.0,
                    "state": b.state,
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
                "open_connections": listener.open_connections,
                "backends": backends,
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
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_page(data: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for lst in data["listeners"]:
        rows.append(
            f"<h2>{esc(lst['name'])} <small>{esc(lst['bind'])} &middot; {esc(lst['state'])}"
            f" &middot; {lst['open_connections']} open</small></h2>"
        )
        rows.append(
            "<table><tr><th>backend</th><th>address</th><th>weight</th><th>share</th>"
            "<th>state</th><th>active</th><th>total</th><th>bytes up</th><th>bytes down</th>"
            "<th>connect failures</th></tr>"
        )
        for b in lst["backends"]:
            state = b["state"]
            if b["drain_seconds_left"] is not None:
                state += f" ({b['drain_seconds_left']:.0f}s left)"
            failures = sum(b["connect_failures"].values())
            share = f"{100 * b['share']:.0f}%"
            bar = f'<span class="bar" style="width:{100 * b["share"]:.0f}px"></span>'
            rows.append(
                f'<tr class="{esc(b["state"])}"><td><b>{esc(b["name"])}</b></td>'
                f"<td>{esc(b['address'])}</td><td>{b['weight']}</td><td>{bar} {share}</td>"
                f"<td>{esc(state)}</td><td>{b['active_connections']}</td>"
                f"<td>{b['total_connections']}</td><td>{_fmt_bytes(b['bytes_upstream'])}</td>"
                f"<td>{_fmt_bytes(b['bytes_downstream'])}</td><td>{failures}</td></tr>"
            )
        rows.append("</table>")
    reload = data["last_reload"] or {}
    at = reload.get("at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"
    errors = "".join(f"<li>{esc(p)}</li>" for p in data["last_error"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{PAGE_REFRESH_S}">
<title>tcpproxy status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
tr.draining td {{ color: #a60; }} tr.unhealthy td {{ color: #b00; }} tr.zero td {{ color: #888; }}
.bar {{ display: inline-block; height: 10px; background: #4a8; }}
small {{ color: #666; font-weight: normal; }} .err {{ color: #b00; }}
</style></head><body>
<h1>tcpproxy <small>{esc(data["version"])}</small></h1>
<p>config <code>{esc(data["config_path"])}</code> sha256 <code>{esc(str(data["sha256"]))}</code><br>
last reload: {esc(str(reload.get("result", "-")))} at {esc(when)}
({esc(str(reload.get("trigger", "-")))}) {esc(str(reload.get("summary", "")))}</p>
{'<ul class="err">' + errors + "</ul>" if errors else ""}
{"".join(rows)}
</body></html>
"""


async def _livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[PROXY_KEY].ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready\n")


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status(request.app[PROXY_KEY]))


async def _page(request: web.Request) -> web.Response:
    return web.Response(text=render_page(status(request.app[PROXY_KEY])), content_type="text/html")


async def _reload(request: web.Request) -> web.Response:
    result = await request.app[PROXY_KEY].reload("admin")
    return web.json_response(result.as_dict(), status=400 if result.result == "failure" else 200)


def make_app(proxy: Proxy) -> web.Application:
    app = web.Application()
    app[PROXY_KEY] = proxy
    app.router.add_get("/metrics", make_aiohttp_handler(proxy.metrics.registry))
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    app.router.add_get("/", _page)
    app.router.add_post("/-/reload", _reload)
    return app


async def start_admin(proxy: Proxy, address: str) -> web.AppRunner:
    host, port = split_host_port(address)
    runner = web.AppRunner(make_app(proxy), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
