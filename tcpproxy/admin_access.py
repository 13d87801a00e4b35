"""Who may use the admin API's state-changing endpoints. Pure: request facts in, a verdict out.

Probes, /metrics and the status (GET and HEAD) are read-only and open to whoever can reach
the port. Every other request (reload, rollout control, and any method a browser could send)
must pass `check_control`:

- the control endpoints must be on: with no admin token they are, only while the admin
  server listens on loopback (only local processes can reach it);
- the Host header must name this server (a loopback name or address, the address it listens
  on, or an allowed host), which defeats DNS rebinding;
- no foreign Origin (nor a Sec-Fetch-Site other than same-origin), so no web page can send
  one: browsers add these headers to every POST and cannot leave them out;
- no form type or text/plain, and no body but a JSON one: HTML forms can only send those
  types, and a page's script can send any other to another origin only after a CORS
  preflight this server never grants;
- the admin token, when one is set, as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

# Methods that never change state; everything else is checked.
READ_ONLY_METHODS = frozenset({"GET", "HEAD"})
JSON = "application/json"
# What an HTML form can send, and the only types a page's script may send to another origin
# without a CORS preflight: never accepted, even with an empty body (a form with no fields).
# With no body any other type is fine (aiohttp's client sends application/octet-stream).
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
# Sec-Fetch-Site values a browser sends when the request did not come from another site's
# page: the status page itself, or a URL typed into the address bar.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # for the log: off, host, cross_site, content_type, token
    message: str  # one line for the client


@dataclass(frozen=True)
class ControlPolicy:
    """How this admin server guards its state-changing endpoints."""

    listen_host: str  # the host of the admin address as configured
    loopback: bool  # it listens on a loopback address only
    has_token: bool
    allowed_hosts: tuple[str, ...] = ()  # lower case; "*" allows any Host

    @property
    def enabled(self) -> bool:
        return self.has_token or self.loopback

    def describe(self) -> str:
        """One line for the startup log."""
        if self.has_token:
            return "control endpoints need the admin token"
        if self.loopback:
            return (
                "control endpoints answer local clients without a token (set "
                "--admin-token-file or TCPPROXY_ADMIN_TOKEN to require one)"
            )
        return (
            "control endpoints are off: no admin token is set and the address is not "
            "loopback (set --admin-token-file or TCPPROXY_ADMIN_TOKEN to use them)"
        )


def is_loopback(host: str) -> bool:
    """A loopback IP address (127.0.0.0/8, ::1) or the name localhost."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def host_name(header: str) -> str | None:
    """The host of a Host header value (`name:port`, `[v6]:port`), lower case; None if it is
    not one."""
    try:
        parsed = urlsplit("//" + header)
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    if parsed.username is not None or parsed.path or parsed.query or parsed.fragment:
        return None
    name = parsed.hostname
    return name.rstrip(".") if name else None


def host_allowed(policy: ControlPolicy, header: str) -> bool:
    if "*" in policy.allowed_hosts:
        return True
    name = host_name(header)
    if name is None:
        return False
    if is_loopback(name) or name in policy.allowed_hosts:
        return True
    listen = policy.listen_host.strip("[]").lower()
    return not _is_wildcard(listen) and name == listen


def _same_origin(origin: str, host_header: str | None) -> bool:
    """Origin `scheme://host[:port]` names the very server the request was sent to."""
    if host_header is None:
        return False
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    if parsed.scheme not in ("http", "https") or parsed.path or not parsed.netloc:
        return False
    return parsed.netloc.lower() == host_header.lower()


def bearer_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def check_control(
    policy: ControlPolicy,
    *,
    host: str | None,
    origin: str | None,
    fetch_site: str | None,
    content_type: str | None,
    has_body: bool,
    authorization: str | None,
    token: str | None,
) -> Refusal | None:
    """None when a state-changing request may go ahead; else why not. `token` is the
    current admin token (None when none is set)."""
    if not policy.enabled:
        return Refusal(
            403,
            "off",
            "the control endpoints are off: this admin server does not listen on loopback "
            "and no admin token is set (--admin-token-file or TCPPROXY_ADMIN_TOKEN)",
        )
    # No Host at all (HTTP/1.0) cannot come from a browser, so it cannot be rebinding.
    if host is not None and not host_allowed(policy, host):
        return Refusal(
            403,
            "host",
            f"Host {host!r} is not this admin server: allowed are loopback names and "
            "addresses, the admin address and --admin-allowed-hosts",
        )
    if origin is not None and not _same_origin(origin, host):
        return Refusal(403, "cross_site", f"cross-site request refused (Origin {origin})")
    if fetch_site is not None and fetch_site.lower() not in _OWN_FETCH_SITES:
        return Refusal(
            403, "cross_site", f"cross-site request refused (Sec-Fetch-Site {fetch_site})"
        )
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type in FORM_TYPES or (has_body and media_type != JSON):
        return Refusal(
            415,
            "content_type",
            f"Content-Type {content_type or 'missing'} is not accepted: send no body, or {JSON}",
        )
    if token is not None:
        given = bearer_token(authorization)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            return Refusal(
                401,
                "token",
                "missing or wrong admin token: send it as Authorization: Bearer <token>",
            )
    return None
