"""`tcpproxy rollout status|pause|resume|abort`: a thin client of the admin API."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_S = 5.0


def _call(url: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


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


def rollout_command(admin: str, action: str, listener: str | None) -> int:
    if admin == "off":
        print(
            "the admin server is off (--admin/TCPPROXY_ADMIN): nothing to talk to", file=sys.stderr
        )
        return 2
    base = f"http://{admin}"
    try:
        _, status = _call(f"{base}/status")
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
            http_status, body = _call(f"{base}/rollout/{name}/{action}", method="POST")
            rollout = body.get("rollout")
            print(describe(name, rollout) if rollout else body.get("error", http_status))
            if http_status != 200:
                print(
                    f"{name}: cannot {action} a rollout that is {rollout['state']}"
                    if rollout
                    else f"{name}: {action} failed",
                    file=sys.stderr,
                )
                code = 1
        return code
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the admin server at {admin}: {exc}", file=sys.stderr)
        return 2
