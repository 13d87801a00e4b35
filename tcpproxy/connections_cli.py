"""`tcpproxy connections [close ID | close --backend B]`: a thin client of the admin API's
/connections endpoints, printing a table."""

from __future__ import annotations

import sys
import urllib.error
from typing import Any
from urllib.parse import urlencode

from tcpproxy.live_connections import MAX_PAGE_SIZE
from tcpproxy.rollout_cli import _call, admin_url

COLUMNS = ("ID", "LISTENER", "BACKEND", "CLIENT", "STATE", "AGE", "UP", "DOWN")


def _span(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


def table(conns: list[dict[str, Any]]) -> str:
    rows = [COLUMNS] + [
        (
            str(c["id"]),
            c["listener"],
            (c["backend"] or "-") + (" (draining)" if c["draining"] else ""),
            c["client"] or "-",
            c["state"],
            _span(c["age_s"]),
            _size(c["bytes_upstream"]),
            _size(c["bytes_downstream"]),
        )
        for c in conns
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def connections_command(
    admin: str,
    action: str | None,
    conn_id: int | None,
    filters: dict[str, str | None],
    token: str | None = None,
) -> int:
    """List the connections the filters match, or close one (`conn_id`) or a backend's."""
    if admin == "off":
        print(
            "the admin server is off (--admin/TCPPROXY_ADMIN): nothing to talk to",
            file=sys.stderr,
        )
        return 2
    params = {key: value for key, value in filters.items() if value is not None}
    base = admin_url(admin)
    try:
        if action == "close":
            return _close(base, conn_id, params, token)
        conns: list[dict[str, Any]] = []
        path: str | None = "/connections?" + urlencode({**params, "limit": MAX_PAGE_SIZE})
        while path is not None:
            status, body = _call(base + path)
            if status != 200:
                print(f"cannot list connections: {body.get('error', status)}", file=sys.stderr)
                return 2 if status != 400 else 1
            conns += body["connections"]
            path = body["next"]
        print(table(conns))
        print(f"{len(conns)} open connection{'' if len(conns) == 1 else 's'}")
        return 0
    except urllib.error.URLError as exc:
        print(f"cannot reach the admin server at {admin}: {exc.reason}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot reach the admin server at {admin}: {exc}", file=sys.stderr)
        return 2


def _close(base: str, conn_id: int | None, params: dict[str, str], token: str | None) -> int:
    if (conn_id is None) == ("backend" not in params):
        print("connections close: give a connection ID or --backend NAME", file=sys.stderr)
        return 2
    if conn_id is not None:
        url = f"{base}/connections/{conn_id}"
    else:
        url = f"{base}/connections?{urlencode(params)}"
    status, body = _call(url, "DELETE", token)
    if status == 200:
        if conn_id is not None:
            print(f"closing connection {conn_id}")
        else:
            print(f"closing {body['closing']} connections of {body['listener']}/{body['backend']}")
        return 0
    print(f"connections close: {body.get('error', status)}", file=sys.stderr)
    return 2 if status in (401, 403, 415) else 1
