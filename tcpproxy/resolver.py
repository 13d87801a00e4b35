"""Backend host names, resolved at connect time: answers cached briefly, addresses in turn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# Long enough to spare a lookup per connection, short enough that a Kubernetes headless
# Service's changing pod IPs are followed within seconds.
DNS_CACHE_S = 5.0

GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]


@dataclass(slots=True)
class _Entry:
    addresses: list[str]
    expires: float
    turn: int = 0


class Resolver:
    def __init__(
        self, getaddrinfo: GetAddrInfo, clock: Callable[[], float], ttl_s: float = DNS_CACHE_S
    ) -> None:
        self._getaddrinfo = getaddrinfo
        self._clock = clock
        self._ttl_s = ttl_s
        self._cache: dict[tuple[str, int], _Entry] = {}
        # One lookup per name at a time: the connections that find the answer missing or
        # expired while it runs all wait for it, rather than each starting its own.
        self._lookups: dict[tuple[str, int], asyncio.Task[_Entry]] = {}

    async def next_address(self, host: str, port: int) -> str:
        """The address to connect to now; raises socket.gaierror when the name does not
        resolve (a stale answer is never reused past its time)."""
        key = (host, port)
        entry = self._cache.get(key)
        if entry is None or entry.expires <= self._clock():
            lookup = self._lookups.get(key)
            if lookup is None or lookup.done():  # (done: cancelled before it could start)
                lookup = asyncio.get_running_loop().create_task(self._look_up(key))
                self._lookups[key] = lookup
            # Shielded: a caller that gives up (its connect timed out, its client left) must
            # not cancel the lookup the others wait for.
            entry = await asyncio.shield(lookup)
        address = entry.addresses[entry.turn % len(entry.addresses)]
        entry.turn += 1
        return address

    async def _look_up(self, key: tuple[str, int]) -> _Entry:
        host, port = key
        try:
            now = self._clock()
            infos = await self._getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if not addresses:
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: no addresses")
            # Keep the turn across refreshes so that a short TTL does not favour the first.
            old = self._cache.get(key)
            entry = _Entry(addresses, now + self._ttl_s, old.turn if old else 0)
            self._cache[key] = entry
            return entry
        finally:
            if self._lookups.get(key) is asyncio.current_task():
                del self._lookups[key]
