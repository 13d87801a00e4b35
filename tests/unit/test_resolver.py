"""Resolver: cached answers, addresses handed out in turn, refreshed after the TTL."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.resolver import Resolver


class FakeDns:
    """Answers from a table; counts lookups. (Real lookups would leave loopback.)"""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups = 0
        self.now = 0.0

    async def getaddrinfo(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        self.lookups += 1
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in self.answers[host]]


@given(
    addresses=st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=6, unique=True),
    n=st.integers(min_value=1, max_value=40),
)
def test_addresses_are_used_in_turn_from_one_lookup(addresses: list[str], n: int) -> None:
    dns = FakeDns({"svc": addresses})
    resolver = Resolver(dns.getaddrinfo, lambda: dns.now, ttl_s=5)

    async def picks() -> list[str]:
        return [await resolver.next_address("svc", 9000) for _ in range(n)]

    got = asyncio.run(picks())
    assert got == [addresses[i % len(addresses)] for i in range(n)]
    assert dns.lookups == 1


def test_answers_expire_and_the_turn_carries_on() -> None:
    dns = FakeDns({"svc": ["10.0.0.1", "10.0.0.2"]})
    resolver = Resolver(dns.getaddrinfo, lambda: dns.now, ttl_s=5)

    async def run() -> list[str]:
        out = [await resolver.next_address("svc", 1)]
        dns.now = 5.0  # expired: looked up again, and the new answer is used
        dns.answers["svc"] = ["10.0.0.3", "10.0.0.4"]
        out += [await resolver.next_address("svc", 1), await resolver.next_address("svc", 1)]
        return out

    assert asyncio.run(run()) == ["10.0.0.1", "10.0.0.4", "10.0.0.3"]
    assert dns.lookups == 2


def test_unknown_name_raises_gaierror_every_time() -> None:
    dns = FakeDns({})
    resolver = Resolver(dns.getaddrinfo, lambda: dns.now)
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            asyncio.run(resolver.next_address("nope", 1))
    assert dns.lookups == 2  # failures are not cached
