"""`tcpproxy rollout status|pause|resume|abort`: in the config file for every replica
(rollout_file.py), from Prometheus for the fleet's view, or through one proxy's admin API."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tcpproxy.config import ConfigError, load_config, parse_duration, split_host_port
from tcpproxy.fleet import aborted_query, failure_query, matchers, promql_duration
from tcpproxy.rollout import Rollout, format_seconds

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
                print(describe(name, rollout) + " (this replica only; --config FILE for all)")
            if http_status in (401, 403):
                # Refused before anything happened: no token, a wrong one, or control off.
                print(f"{name}: {action} refused: {body.get('error')}", file=sys.stderr)
                return 2
            if http_status != 200:
                if not rollout:
                    why = f"{action} failed: {body.get('error', http_status)}"
                elif rollout.get("paused_at") is not None and action == "resume":
                    why = "paused in the config file: resume it there (--config FILE)"
                elif rollout.get("aborted_at") is not None:
                    why = f"aborted in the config file: cannot {action} it"
                else:
                    why = f"cannot {action} a rollout that is {rollout['state']}"
                print(f"{name}: {why}", file=sys.stderr)
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


def fleet_command(args: argparse.Namespace) -> int:
    """`rollout ... --config FILE` and `rollout status --prometheus URL`."""
    if args.prometheus is not None:
        if args.action != "status":
            print(
                "--prometheus shows the fleet (status); to steer every replica, record "
                f"the {args.action} in the config file with --config FILE",
                file=sys.stderr,
            )
            return 2
        try:
            window = parse_duration(args.window)
        except ValueError as exc:
            print(f"--window: {exc}", file=sys.stderr)
            return 2
        return prometheus_status(args.prometheus, args.listener, window)
    if args.rollout_config is None:
        print("start needs --config FILE: it writes started_at there", file=sys.stderr)
        return 2
    if args.action == "status":
        return file_status(args.rollout_config, args.listener)
    from tcpproxy.rollout_file import EditError, edit_file  # noqa: PLC0415

    try:
        lines = edit_file(
            args.rollout_config,
            args.action,
            listener=args.listener,
            reason=args.reason,
            configmap=args.configmap,
            key=args.configmap_key,
            namespace=args.namespace,
        )
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except EditError as exc:
        print(f"{args.rollout_config}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.rollout_config}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def file_status(path: Path, listener: str | None) -> int:
    """What the file and the clock say every replica does now (a rollout without
    started_at starts when each replica applies it: no single answer)."""
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    now = time.time()
    found = False
    for lst in loaded.config.listeners:
        if lst.rollout is None or (listener is not None and lst.name != listener):
            continue
        found = True
        rollout = Rollout(lst.rollout, lst.rollout.identity(lst.name), now)
        rollout.awaiting_fleet = False
        rollout.applied_step = rollout.step(now)
        rollout.applied_share = rollout.share(now)
        if rollout.state == "running" and rollout.step(now) >= len(lst.rollout.steps):
            rollout.done = True
        line = describe(lst.name, rollout.as_dict(now))
        if lst.rollout.started_at is None:
            line += " (no started_at: each replica counts from when it applied the block)"
        print(f"{line} [rollout {rollout.identity}]")
        prometheus = lst.rollout.abort.prometheus
        if prometheus is not None:
            print(
                f"  judged by Prometheus at {prometheus.url} every "
                f"{format_seconds(prometheus.interval)}:\n"
                f"    failure ratio: {failure_query(lst.name, lst.rollout)}\n"
                f"    aborted by a replica: {aborted_query(rollout.identity, prometheus)}"
            )
    if not found:
        where = f"listener {listener!r}" if listener else "any listener"
        print(f"{path}: no rollout on {where}", file=sys.stderr)
        return 1
    return 0


def _prom_query(base: str, query: str) -> list[dict[str, Any]]:
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise ValueError(body.get("error", "query failed"))
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _replica(labels: dict[str, str]) -> str:
    return labels.get("pod") or labels.get("instance") or "?"


def prometheus_status(base: str, listener: str | None, window_s: float) -> int:
    """Each replica's rollout as Prometheus last scraped it, and the share of new
    connections the fleet really sent to `to` over the window."""
    where = matchers("", listener=listener) if listener else ""
    try:
        infos = _prom_query(base, f"tcpproxy_rollout_info{where}")
        steps = _prom_query(base, f"tcpproxy_rollout_step{where}")
        states = _prom_query(base, f"tcpproxy_rollout_state{where} == 1")
        shares = _prom_query(base, f"tcpproxy_rollout_share_percent{where}")
        window = promql_duration(window_s)
        counts = _prom_query(
            base,
            f"sum by (listener, backend) (increase(tcpproxy_connections_total{where}[{window}]))",
        )
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        print(f"cannot query Prometheus at {base}: {text}", file=sys.stderr)
        return 2
    if not infos:
        print(f"Prometheus at {base} has no rollout of any replica", file=sys.stderr)
        return 1

    def by_replica(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["metric"].get("listener", ""), _replica(r["metric"])): r for r in rows}

    step_of, state_of, share_of = by_replica(steps), by_replica(states), by_replica(shares)
    rollouts: dict[tuple[str, str], list[dict[str, str]]] = {}
    for info in infos:
        labels = info["metric"]
        rollouts.setdefault((labels.get("listener", ""), labels.get("rollout", "")), []).append(
            labels
        )
    new: dict[tuple[str, str], float] = {
        (r["metric"].get("listener", ""), r["metric"].get("backend", "")): float(r["value"][1])
        for r in counts
    }
    for (name, identity), replicas in sorted(rollouts.items()):
        first = replicas[0]
        count = len(first.get("steps", "").split(","))
        print(f"{name}: rollout {identity}: {first.get('from')} -> {first.get('to')}")
        print(f"  {'REPLICA':<28} {'STEP':>6}  {'STATE':<10} {'SHARE':>6}")
        for labels in sorted(replicas, key=_replica):
            key = (name, _replica(labels))
            step = step_of.get(key, {}).get("value", [0, "?"])[1]
            state = state_of.get(key, {}).get("metric", {}).get("state", "?")
            share = share_of.get(key, {}).get("value", [0, "?"])[1]
            print(f"  {_replica(labels):<28} {f'{step}/{count}':>6}  {state:<10} {share + '%':>6}")
        to, from_ = first.get("to", ""), first.get("from", "")
        n_to, n_from = new.get((name, to), 0.0), new.get((name, from_), 0.0)
        n_all = sum(n for (lst, _), n in new.items() if lst == name)
        span = format_seconds(window_s)
        if n_to + n_from > 0:
            print(
                f"  fleet: {n_to / (n_to + n_from):.1%} of the pair's new connections to {to} "
                f"({n_to / n_all:.1%} of all {n_all:.0f}) over the last {span}"
            )
        else:
            print(f"  fleet: no new connections to {from_} or {to} over the last {span}")
    return 0
