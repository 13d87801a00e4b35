"""`tcpproxy rollout status|pause|resume|abort`: a thin client of the admin API."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from tcpproxy.config import split_host_port

TIMEOUT_S = 5.0


def admin_url(admin: str) -> str:
    """The URL of the admin server at `admin`; a wildcard bind address (the container's
    0.0.0.0:9901) is reached on loopback, which its Host rules accept."""
    host, port = split_host_port(admin)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            try:
                return response.status, json.load(response)
            except ValueError:  # not JSON: whatever answers there is no tcpproxy
                return response.status, {"error": "the answer is not JSON"}
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                return exc.code, json.load(exc)
            except ValueError:
                return exc.code, {"error": f"HTTP {exc.code} {exc.reason}"}


def describe(listener: str, rollout: dict[str, Any]) -> str:
    line = (
        f"{listener}: {rollout['from']} -> {rollout['to']} {rollout['state']}, "
        f"step {rollout['step']}/{len(rollout['steps'])}, {rollout['share']}% to {rollout['to']}"
    )
    if rollout.get("next_step_in_s") is not None:
        line += f", next step in {rollout['next_step_in_s']:.0f}s"
    if rollout.get("reason"):
        line += f" ({rollout['reason']})"
    return line


def rollout_command(admin: str, action: str, listener: str | None, token: str | None = None) -> int:
    """`token`: the admin token to send (pause, resume and abort need it when the server
    has one)."""
    if admin == "off":
        print(
            "the admin server is off (--admin/TCPPROXY_ADMIN): nothing to talk to", file=sys.stderr
        )
        return 2
    base = admin_url(admin)
    try:
        http_status, status = _call(f"{base}/status")
        if http_status != 200 or not isinstance(status, dict) or "listeners" not in status:
            print(f"{admin} is not a tcpproxy admin server (HTTP {http_status})", file=sys.stderr)
            return 2
        rollouts = {
            lst["name"]: lst["rollout"]
            for lst in status["listeners"]
            if lst.get("rollout") and (listener is None or lst["name"] == listener)
        }
        if not rollouts:
            where = f"listener {listener!r}" if listener else "any listener"
            print(f"no rollout on {where}", file=sys.stderr)
            return 1
        if action == "status":
            for name, rollout in rollouts.items():
                print(describe(name, rollout))
            return 0
        code = 0
        for name in rollouts:
            http_status, body = _call(f"{base}/rollout/{name}/{action}", "POST", token)
            rollout = body.get("rollout")
            if rollout:
                print(describe(name, rollout))
            if http_status in (401, 403):
                # Refused before anything happened: no token, a wrong one, or control off.
                print(f"{name}: {action} refused: {body.get('error')}", file=sys.stderr)
                return 2
            if http_status != 200:
                print(
                    f"{name}: cannot {action} a rollout that is {rollout['state']}"
                    if rollout
                    else f"{name}: {action} failed: {body.get('error', http_status)}",
                    file=sys.stderr,
                )
                code = 1
        return code
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, OSError):
            reason = reason.strerror or str(reason)  # "Connection refused", not the repr
        print(
            f"cannot reach the admin server at {admin}: {reason} (is tcpproxy running with "
            "its admin server there? --admin or TCPPROXY_ADMIN says where)",
            file=sys.stderr,
        )
        return 2
