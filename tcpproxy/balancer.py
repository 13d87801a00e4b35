"""Smooth weighted round-robin (the nginx algorithm). Pure: no I/O, no asyncio.

Each pick adds every eligible item's weight to its running score, takes the item with the
highest score and subtracts the total from it. Over any sum(weights) consecutive picks with
unchanged eligibility, each item is picked exactly `weight` times, interleaved rather than
in bursts (5/1/1 gives a a b a c a a, not a a a a a b c).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SmoothWeightedRoundRobin(Generic[T]):
    __slots__ = ("_current", "_items", "_weights")

    def __init__(self, weighted: Sequence[tuple[T, int]]) -> None:
        if any(weight < 0 for _, weight in weighted):
            raise ValueError("weights must be >= 0")
        self._items = [item for item, _ in weighted]
        self._weights = [weight for _, weight in weighted]
        self._current = [0] * len(weighted)

    @property
    def items(self) -> list[T]:
        return list(self._items)

    def pick(
        self,
        eligible: Callable[[T], bool] | None = None,
        exclude: Container[T] = (),
    ) -> T | None:
        """Next item, skipping weight 0, `exclude`d and not-`eligible` items; None if none."""
        best = -1
        total = 0
        items, weights, current = self._items, self._weights, self._current
        for i, weight in enumerate(weights):
            if weight == 0:
                continue
            item = items[i]
            if item in exclude or (eligible is not None and not eligible(item)):
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return items[best]
