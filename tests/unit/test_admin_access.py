"""The admin API's rules for state-changing requests, as pure functions (admin_access.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.admin_access import (
    ControlPolicy,
    Refusal,
    bearer_token,
    check_control,
    host_allowed,
    host_name,
    is_loopback,
)
from tcpproxy.admin_server import Slots

LOOPBACK = ControlPolicy(listen_host="127.0.0.1", loopback=True, has_token=False)
WILDCARD_TOKEN = ControlPolicy(listen_host="0.0.0.0", loopback=False, has_token=True)
TOKEN = "0123456789abcdefghij"


def check(policy: ControlPolicy = LOOPBACK, **request: str | bool | None) -> Refusal | None:
    facts: dict[str, str | bool | None] = {
        "host": "127.0.0.1:9901",
        "origin": None,
        "fetch_site": None,
        "content_type": None,
        "has_body": False,
        "authorization": None,
        "token": None,
    }
    facts.update(request)
    return check_control(policy, **facts)  # type: ignore[arg-type]


def test_a_plain_local_request_passes() -> None:
    assert check() is None


def test_no_token_and_no_loopback_is_off_whatever_the_request() -> None:
    policy = ControlPolicy(listen_host="0.0.0.0", loopback=False, has_token=False)
    refusal = check(policy)
    assert refusal is not None
    assert (refusal.status, refusal.reason) == (403, "off")
    assert not policy.enabled
    assert "control endpoints are off" in policy.describe()


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:9901", "127.0.0.1"),
        ("LocalHost:80", "localhost"),
        ("localhost.", "localhost"),
        ("[::1]:9901", "::1"),
        ("tcpproxy-admin.default.svc", "tcpproxy-admin.default.svc"),
        ("a:b", None),  # not a port
        ("[::1", None),
        ("x/y", None),
        ("user@host", None),
        ("", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("localhost.evil.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_hosts_allowed_by_default_are_loopback_and_the_listen_address() -> None:
    on_ip = ControlPolicy(listen_host="10.1.2.3", loopback=False, has_token=True)
    assert host_allowed(on_ip, "10.1.2.3:9901")
    assert host_allowed(on_ip, "localhost:9901")
    assert not host_allowed(on_ip, "10.1.2.4:9901")
    # A wildcard address names no host: only loopback ones.
    assert not host_allowed(WILDCARD_TOKEN, "0.0.0.0:9901")
    assert not host_allowed(WILDCARD_TOKEN, "evil.example:9901")
    extra = ControlPolicy("0.0.0.0", False, True, allowed_hosts=("tcpproxy-admin",))
    assert host_allowed(extra, "tcpproxy-admin:9901")
    assert host_allowed(ControlPolicy("0.0.0.0", False, True, ("*",)), "anything:1")


@given(st.text(max_size=40))
def test_no_host_header_rebinds_to_a_name_outside_the_list(header: str) -> None:
    allowed = host_allowed(LOOPBACK, header)
    name = host_name(header)
    assert not allowed or (name is not None and is_loopback(name))


@pytest.mark.parametrize(
    ("origin", "fetch_site", "ok"),
    [
        (None, None, True),
        ("http://127.0.0.1:9901", "same-origin", True),
        ("http://127.0.0.1:9901", None, True),
        (None, "none", True),  # typed into the address bar
        ("http://127.0.0.1:9902", None, False),  # another port: same site, other origin
        ("http://127.0.0.2:9901", None, False),
        ("http://localhost:9901", None, False),  # the Host says 127.0.0.1
        ("null", None, False),
        ("http://127.0.0.1:9901/x", None, False),
        ("ftp://127.0.0.1:9901", None, False),
        (None, "same-site", False),
        (None, "cross-site", False),
    ],
)
def test_origin_rules(origin: str | None, fetch_site: str | None, ok: bool) -> None:
    refusal = check(origin=origin, fetch_site=fetch_site)
    assert (refusal is None) is ok
    if not ok:
        assert refusal is not None
        assert (refusal.status, refusal.reason) == (403, "cross_site")


@pytest.mark.parametrize(
    ("content_type", "has_body", "ok"),
    [
        (None, False, True),
        ("application/json", True, True),
        ("Application/JSON; charset=utf-8", True, True),
        ("application/json", False, True),
        ("application/octet-stream", False, True),  # aiohttp's client, posting nothing
        ("application/octet-stream", True, False),
        (None, True, False),
        ("text/plain", True, False),
        ("text/plain", False, False),
        ("application/x-www-form-urlencoded", False, False),
        ("multipart/form-data; boundary=x", True, False),
    ],
)
def test_content_types(content_type: str | None, has_body: bool, ok: bool) -> None:
    refusal = check(content_type=content_type, has_body=has_body)
    assert (refusal is None) is ok
    if not ok:
        assert refusal is not None
        assert refusal.status == 415


@pytest.mark.parametrize(
    ("authorization", "ok"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer  {TOKEN} ", True),
        (None, False),
        ("Bearer", False),
        (f"Bearer {TOKEN}x", False),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
    ],
)
def test_token(authorization: str | None, ok: bool) -> None:
    refusal = check(WILDCARD_TOKEN, authorization=authorization, token=TOKEN)
    assert (refusal is None) is ok
    if not ok:
        assert refusal is not None
        assert refusal.status == 401


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_slots_close_the_longest_waiting_and_never_a_busy_one() -> None:
    slots: Slots[str] = Slots(3)
    for key in ("a", "b", "c"):
        slots.open(key)
    assert slots.full
    assert slots.victim() == "a"
    slots.busy("a")
    assert slots.victim() == "b"
    slots.idle("a")  # answered: waiting again, now the newest
    assert slots.victim() == "b"
    slots.close("b")
    assert slots.victim() == "c"
    assert not slots.full
    for key in ("a", "c"):
        slots.busy(key)
    slots.open("d")
    slots.busy("d")
    assert slots.full
    assert slots.victim() is None  # every one mid-request: the newcomer is refused
    slots.idle("c")
    assert slots.victim() == "c"
    assert len(slots) == 3
