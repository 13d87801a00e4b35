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
        return self.answer(host, port)

    def answer(self, host: str, port: int) -> list[tuple[Any, ...]]:
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


class GatedDns(FakeDns):
    """FakeDns whose lookups wait until `release` is set, so that callers can overlap."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        super().__init__(answers)
        self.release = asyncio.Event()

    async def getaddrinfo(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        self.lookups += 1
        await self.release.wait()
        return self.answer(host, port)


async def settle() -> None:
    """Run the ready tasks until each waits: a caller takes one loop turn to reach its await,
    a lookup it started one more. (No I/O here: the turns are deterministic.)"""
    for _ in range(5):
        await asyncio.sleep(0)


@given(
    addresses=st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=6, unique=True),
    callers=st.integers(min_value=2, max_value=30),
    expired=st.booleans(),
)
def test_concurrent_callers_share_one_lookup(
    addresses: list[str], callers: int, expired: bool
) -> None:
    """Callers that find the answer missing (or expired) while a lookup runs wait for that
    one, then take its addresses in turn."""
    dns = GatedDns({"svc": addresses})
    resolver = Resolver(dns.getaddrinfo, lambda: dns.now, ttl_s=5)

    async def run() -> list[str]:
        if expired:
            dns.release.set()
            await resolver.next_address("svc", 1)
            dns.release.clear()
            dns.now = 5.0
        before = dns.lookups
        tasks = [asyncio.create_task(resolver.next_address("svc", 1)) for _ in range(callers)]
        await settle()
        assert not any(t.done() for t in tasks)
        assert dns.lookups - before == 1
        dns.release.set()
        return await asyncio.gather(*tasks)

    got = asyncio.run(run())
    first = 1 if expired else 0  # the turn carries on across the refresh
    assert got == [addresses[(first + i) % len(addresses)] for i in range(callers)]


def test_a_failed_shared_lookup_fails_every_caller_and_is_not_cached() -> None:
    dns = GatedDns({})
    resolver = Resolver(dns.getaddrinfo, lambda: dns.now)

    async def run() -> list[BaseException | str]:
        tasks = [asyncio.create_task(resolver.next_address("nope", 1)) for _ in range(5)]
        await settle()
        assert dns.lookups == 1
        dns.release.set()
        got = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(socket.gaierror):
            await resolver.next_address("nope", 1)
        assert dns.lookups == 2  # looked up again, not a cached failure
        return got

    got = asyncio.run(run())
    assert all(isinstance(r, socket.gaierror) for r in got)


def test_a_caller_giving_up_does_not_cancel_the_lookup_others_wait_for() -> None:
    dns = GatedDns({"svc": ["10.0.0.1"]})
    resolver = Resolver(dns.getaddrinfo, lambda: dns.now)

    async def run() -> str:
        quitter = asyncio.create_task(resolver.next_address("svc", 1))
        stayer = asyncio.create_task(resolver.next_address("svc", 1))
        await settle()
        quitter.cancel()  # as when its connect times out
        with pytest.raises(asyncio.CancelledError):
            await quitter
        dns.release.set()
        return await stayer

    assert asyncio.run(run()) == "10.0.0.1"
    assert dns.lookups == 1
