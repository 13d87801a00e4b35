"""Client affinity: new connections from one client address reach the same backend, by
weighted rendezvous hashing. Pure: no I/O, no asyncio.

Every (client, backend) pair gets a hash h in (0, 1) and the score -ln(h) / weight, an
exponential variable of rate `weight`; the client goes to the backend of lowest score. So a
backend's share of clients is weight / sum(weights), and a change moves only the clients that
must move: raising one weight lowers only that backend's scores (clients move to it, from
anyone), lowering it moves only its own clients away, and adding or removing a backend moves
only its share. A backend that cannot take a client (unhealthy, ejected, draining, weight 0,
or already tried) is passed over for that client's next-best: only its clients move, and they
come back when it does. Ring hashing (Ketama) and Maglev build a table from the weights:
shares only as fine as the table, and Maglev's rebuild moves some clients between backends
whose weights did not change. Rendezvous needs no table, at the cost of one hash per backend
a pick.

A rollout (from, to, share) is one group: the pair's score is the lower of its two backends'
scores, an exponential of rate weight(from) + weight(to), so the pair holds exactly the
clients it holds without the rollout, and no step touches anyone else. Inside it a second,
per-client hash u in [0, 1) decides: `to` when u < share / 100, else `from`. Each client has
a fixed u, so raising the share only moves clients from `from` to `to`, never back and never
to a bystander; an abort (share 0) sends every `to` client back to `from`. Scoring the two
members separately instead would not be monotone: raising `to` would take clients from the
bystanders too.

Hashes are blake2b and a 64-bit mixer, not Python's hash(): every replica of a fleet, and a
restarted proxy, computes the same mapping from the same config.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
# A group: its members as (seed, 1 / weight) for scoring, and (from, to) when it is the
# rollout's pair, else (item, None).
_Group = tuple[list[tuple[int, float]], T, T | None]

_MASK64 = (1 << 64) - 1
# Salt of the in-pair hash u, so that it is independent of the pair's group score.
_SPLIT_SALT = 0x9E3779B97F4A7C15
_UNIT_STEP = 2.0**-53


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64 bits in which every input bit flips about
    half of the output bits, so hashes of one client with different seeds look independent."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def client_key(address: str) -> int:
    """The 64-bit key of a client IP address. An IPv4-mapped IPv6 address (a dual-stack
    listener's view of an IPv4 client) is keyed as the IPv4 address, so that listeners bound
    to 0.0.0.0 and [::] map a client alike."""
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    return _digest64(address)


def backend_seed(name: str) -> int:
    """A backend is hashed by its name: one whose address changes keeps its clients."""
    return _digest64(name)


def split_point(key: int, to_seed: int) -> float:
    """The client's u in [0, 1) for a rollout to the backend of `to_seed`."""
    return (_mix(key ^ to_seed ^ _SPLIT_SALT) >> 11) * _UNIT_STEP


class ClientHash(Generic[T]):
    """Picks a backend for a client key among `(item, name, weight)` entries, with an
    optional rollout `(from name, to name, to's share in percent)` over two of them.
    Rebuilt on every change of weights or share; a pick keeps no state."""

    __slots__ = ("_groups", "_share", "_to_seed")

    def __init__(
        self,
        weighted: Sequence[tuple[T, str, int]],
        rollout: tuple[str, str, int] | None = None,
    ) -> None:
        if any(weight < 0 for _, _, weight in weighted):
            raise ValueError("weights must be >= 0")
        by_name = {name: (item, name, weight) for item, name, weight in weighted}
        pair: tuple[str, str] | None = None
        self._share = 0.0
        self._to_seed = 0
        if rollout is not None and rollout[0] in by_name and rollout[1] in by_name:
            pair = rollout[0], rollout[1]
            self._share = min(max(rollout[2], 0), 100) / 100
            self._to_seed = backend_seed(rollout[1])
        # Weight-0 members never score; a group with none is left out.
        self._groups: list[_Group[T]] = []
        for item, name, weight in weighted:
            if pair is not None and name == pair[1]:
                continue  # scored with `from`, its pair
            members = [(backend_seed(name), 1 / weight)] if weight > 0 else []
            partner: T | None = None
            if pair is not None and name == pair[0]:
                partner, to_weight = by_name[pair[1]][0], by_name[pair[1]][2]
                if to_weight > 0:
                    members.append((backend_seed(pair[1]), 1 / to_weight))
            if members:
                self._groups.append((members, item, partner))

    def pick(
        self,
        key: int,
        eligible: Callable[[T], bool] | None = None,
        exclude: Collection[T] = (),
    ) -> T | None:
        """The backend for client `key`: its best-scoring group's, passing over items that
        are excluded or not `eligible` for the next group; None when no group has one."""
        groups = self._groups
        if not groups:
            return None
        scores, best = self._scores(key)
        chosen = self._take(key, groups[best], eligible, exclude)
        if chosen is not None or len(groups) == 1:
            return chosen
        # The client's best group cannot take it (unhealthy, ejected, draining, or tried):
        # its next-best ones, in order.
        for i in sorted(range(len(groups)), key=scores.__getitem__)[1:]:
            chosen = self._take(key, groups[i], eligible, exclude)
            if chosen is not None:
                return chosen
        return None

    def _scores(self, key: int) -> tuple[list[float], int]:
        """Each group's score for client `key` (the lowest of its members' -ln(h) / weight),
        and the index of the lowest. _mix written out (a pick is on every new connection's
        path), then h in (0, 1): the top 53 bits, offset by half a step so that h is never
        0."""
        log, mask = math.log, _MASK64
        scores = []
        best, best_score = 0, math.inf
        for i, (members, _, _) in enumerate(self._groups):
            score = math.inf
            for seed, inverse_weight in members:
                x = key ^ seed
                x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
                x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
                x ^= x >> 31
                s = -log(((x >> 11) + 0.5) * _UNIT_STEP) * inverse_weight
                score = s if s < score else score
            scores.append(score)
            if score < best_score:
                best, best_score = i, score
        return scores, best

    def _take(
        self,
        key: int,
        group: _Group[T],
        eligible: Callable[[T], bool] | None,
        exclude: Collection[T],
    ) -> T | None:
        _, first, partner = group
        if partner is None:
            candidates: tuple[T, ...] = (first,)
        else:
            # The pair: `to` when the client's u is under the share, else `from`; the other
            # one takes over if that one cannot, as long as its share is not 0.
            from_, to = first, partner
            share = self._share
            if share >= 1:
                candidates = (to,)
            elif share <= 0:
                candidates = (from_,)
            elif split_point(key, self._to_seed) < share:
                candidates = (to, from_)
            else:
                candidates = (from_, to)
        for item in candidates:
            if item not in exclude and (eligible is None or eligible(item)):
                return item
        return None
