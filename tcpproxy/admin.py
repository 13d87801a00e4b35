"""Admin HTTP server: metrics, probes, status (JSON; the HTML page is status_page.py's),
reload, rollout control and live connections (live_connections.py). Who may change state:
admin_access.py; the admin server's own connections: admin_server.py."""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from tcpproxy import __version__, live_connections
from tcpproxy.admin_access import (
    READ_ONLY_METHODS,
    ControlPolicy,
    Refusal,
    check_control,
    is_loopback,
)
from tcpproxy.admin_server import AdminSite, Connections, LogQuota, format_peer, listening_socket
from tcpproxy.backend import Backend
from tcpproxy.config import split_host_port
from tcpproxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tcpproxy.proxy import Proxy
from tcpproxy.settings import (
    DEFAULT_ADMIN_MAX_CONNECTIONS,
    DEFAULT_ADMIN_READ_TIMEOUT_S,
    Settings,
    read_admin_token,
)
from tcpproxy.status_page import render_page

log = logging.getLogger("tcpproxy")

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
# The oldest open connections /status lists per backend (more for a draining one: those are
# what its drain waits for).
OLDEST_LISTED = 3
OLDEST_LISTED_DRAINING = 10


def _oldest(backend: Backend) -> list[dict[str, Any]]:
    count = OLDEST_LISTED_DRAINING if backend.draining else OLDEST_LISTED
    oldest = heapq.nsmallest(count, backend.connections, key=lambda c: c.id)
    return [live_connections.describe(c) for c in oldest]


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
                    "oldest_connections": _oldest(b),
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
        "reloads": [
            {
                "at": r.at,
                "result": r.result,
                "trigger": r.trigger,
                "sha256": r.sha256,
                "summary": r.summary,
                "problems": len(r.problems),
            }
            for r in proxy.reloads
        ],
        "listeners": listeners,
    }


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


def _bad_query(exc: ValueError) -> web.Response:
    return web.json_response({"error": str(exc)}, status=400, headers=_NO_STORE)


async def _connections(request: web.Request) -> web.Response:
    try:
        query = live_connections.Query.parse(request.query)
    except ValueError as exc:
        return _bad_query(exc)
    listeners = request.app[PROXY_KEY].all_listeners()
    return web.json_response(live_connections.listing(listeners, query), headers=_NO_STORE)


async def _close_connection(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    conn_id = int(request.match_info["id"])
    conn = live_connections.find(proxy.all_listeners(), conn_id)
    if conn is None:
        return web.json_response({"error": f"no open connection {conn_id}"}, status=404)
    described = live_connections.describe(conn)
    log.warning(
        "%s: closing connection %d from %s to %s, asked for by %s",
        described["listener"],
        conn_id,
        described["client"],
        described["backend"] or "-",
        _who(request),
        extra={"listener": described["listener"], "client": _peer(request)},
    )
    live_connections.close(conn)
    return web.json_response({"closing": 1, "connections": [described]})


async def _close_connections(request: web.Request) -> web.Response:
    """Every connection of one backend (narrowed by the other filters): "drain now"."""
    try:
        query = live_connections.Query.parse(request.query, paged=False)
    except ValueError as exc:
        return _bad_query(exc)
    if query.backend is None:
        return _bad_query(ValueError("backend: required (the backend whose connections to end)"))
    proxy = request.app[PROXY_KEY]
    holding = sorted(
        {
            lst.name
            for lst in proxy.all_listeners()
            if query.listener in (None, lst.name)
            and any(b.name == query.backend for b in lst.all_backends())
        }
    )
    if not holding:
        where = f" on listener {query.listener!r}" if query.listener else ""
        return web.json_response({"error": f"no backend {query.backend!r}{where}"}, status=404)
    if len(holding) > 1:
        return _bad_query(
            ValueError(
                f"listener: required, backend {query.backend!r} is on listeners "
                f"{', '.join(holding)}"
            )
        )
    query = replace(query, listener=holding[0])
    count = live_connections.close_matching(proxy.all_listeners(), query)
    log.warning(
        "%s: closing %d connections of %s, asked for by %s",
        holding[0],
        count,
        query.backend,
        _who(request),
        extra={"listener": holding[0], "backend": query.backend, "client": _peer(request)},
    )
    return web.json_response({"closing": count, "listener": holding[0], "backend": query.backend})


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
    app.router.add_get("/connections", _connections)
    app.router.add_delete("/connections", _close_connections)
    app.router.add_delete(r"/connections/{id:\d{1,19}}", _close_connection)
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
