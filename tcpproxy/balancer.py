"""Smooth weighted round-robin in O(log n) a pick: an earliest-deadline-first scheduler over two
heaps (as Envoy's EDF scheduler, with WF2Q's rule for when a job may start). Pure: no I/O.

Each item of weight w is a stream of unit jobs: its k-th pick (from 0) may start at virtual
time k/w and is due at (k+1)/w. Virtual time is the picks made so far over the total weight,
V = sum(k) / sum(w). A pick takes, of the jobs that may start (k/w <= V), the one due first
(on a tie, the item listed first). With unchanged eligibility:

- over any sum(weights) consecutive picks each item is picked exactly `weight` times: every
  job due by the end of a cycle is done within it, and no job of the next cycle may start
  before it ends; the sequence repeats with that period;
- smooth: after any t picks each item has been picked within one of t*w/sum(w) times, so no
  long runs (5/1/1 gives a b a a c a a, not a a a a a b c).

Virtual time is computed from whole numbers (picks, weights), never from summed floats, so
the shares stay exact however long the proxy runs.

Items that are not `eligible` (a predicate, usually Backend.eligible) are found as they come
to the front, and parked: out of the heaps and of the virtual time, so that the others keep
exact shares among themselves. Parked items are asked again in turn, every one of them within
PARKED_RECHECK_PICKS picks (and all of them before a pick would find nothing), and come back
at the current virtual time: no burst of picks to make up for the time away. A pick with
another predicate than the last one asks every item (O(n)): pass the same one each time.
Items `exclude`d (backends a retry has tried) are skipped for that pick only, and leave the
virtual time for it, so that the rest keep their shares. A retry (a pick that excludes the
item the last pick was for) takes no turn: the failed item has had its turn, and the one
that takes its connection over keeps its own, so first attempts follow the weights even
while a backend fails.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# Every parked item is asked again within this many picks (len(parked) / this, a pick).
PARKED_RECHECK_PICKS = 32

# A heap entry: (whole part, fraction, item index) of a time k/w; the whole part is exact,
# so that no rounding can move a job across the end of a cycle.
_Entry = tuple[int, float, int]


def _entry(numerator: int, weight: int, index: int) -> _Entry:
    whole, rest = divmod(numerator, weight)
    return whole, rest / weight, index


class SmoothWeightedRoundRobin(Generic[T]):
    """Picks among weighted items; the items must be hashable (`exclude` is looked up)."""

    __slots__ = (
        "_index",
        "_is_parked",
        "_items",
        "_parked",
        "_parked_at",
        "_pending",
        "_picked",
        "_predicate",
        "_ready",
        "_total_picked",
        "_total_weight",
        "_turn_holder",
        "_weights",
    )

    def __init__(self, weighted: Sequence[tuple[T, int]]) -> None:
        if any(weight < 0 for _, weight in weighted):
            raise ValueError("weights must be >= 0")
        self._items = [item for item, _ in weighted]
        self._weights = [weight for _, weight in weighted]
        self._index: dict[T, list[int]] = {}
        for i, item in enumerate(self._items):
            self._index.setdefault(item, []).append(i)
        self._picked = [0] * len(weighted)  # k, an item's picks so far
        # Over the scheduled items (weight > 0, not parked): V = total_picked / total_weight.
        self._total_picked = 0
        self._total_weight = sum(self._weights)
        # Jobs that may start, by due time; jobs that may not start yet, by start time.
        self._ready = [_entry(1, w, i) for i, w in enumerate(self._weights) if w > 0]
        heapq.heapify(self._ready)
        self._pending: list[_Entry] = []
        # Parked items in the order they are asked again: the front one next.
        self._parked: deque[int] = deque()
        self._is_parked = [False] * len(weighted)
        self._parked_at = (0, 1)  # V before the last scheduled items were parked
        self._predicate: Callable[[T], bool] | None = None
        self._turn_holder = -1  # the item the last pick was for

    @property
    def items(self) -> list[T]:
        return list(self._items)

    def pick(
        self,
        eligible: Callable[[T], bool] | None = None,
        exclude: Collection[T] = (),
    ) -> T | None:
        """Next item, skipping weight 0, `exclude`d and not-`eligible` items; None if none."""
        if self._total_weight:
            # The time as it is, for items that come back once every one has been parked.
            self._parked_at = (self._total_picked, self._total_weight)
        if eligible != self._predicate:
            self._new_predicate(eligible)
        elif self._parked:
            self._recheck(eligible, -(-len(self._parked) // PARKED_RECHECK_PICKS))
        # A retry: the last item picked is excluded (its connect failed). That item has had
        # its turn; the one picked now takes the connection over without losing its own, so
        # that first attempts keep following the weights while a backend fails.
        holder = self._turn_holder
        replacing = bool(exclude) and holder >= 0 and self._items[holder] in exclude
        aside: list[_Entry] = []
        chosen = self._choose(eligible, exclude, aside)
        if chosen < 0 and self._parked:
            # Nothing scheduled is left: before answering None, ask every parked item.
            self._recheck(eligible, len(self._parked))
            chosen = self._choose(eligible, exclude, aside)
        if chosen >= 0:
            weight = self._weights[chosen]
            if replacing:
                heapq.heappush(self._ready, _entry(self._picked[chosen] + 1, weight, chosen))
            else:
                self._picked[chosen] += 1
                self._total_picked += 1
                heapq.heappush(self._pending, _entry(self._picked[chosen], weight, chosen))
            self._turn_holder = chosen
        self._put_back(aside)
        return self._items[chosen] if chosen >= 0 else None

    def _put_back(self, aside: list[_Entry]) -> None:
        """Excluded items that were due: each keeps its turn for the next pick, but no more
        than the current virtual time allows, however often it is excluded (no burst)."""
        weights, picked = self._weights, self._picked
        total_picked, total_weight = self._total_picked, self._total_weight
        for entry in aside:
            i = entry[2]
            caught_up = total_picked * weights[i] // total_weight
            if caught_up > picked[i]:
                self._total_picked += caught_up - picked[i]
                picked[i] = caught_up
                heapq.heappush(self._pending, _entry(picked[i], weights[i], i))
            else:
                heapq.heappush(self._ready, entry)

    def _choose(
        self, eligible: Callable[[T], bool] | None, exclude: Collection[T], aside: list[_Entry]
    ) -> int:
        """The index of the next item, or -1; parks the ineligible ones it meets, and sets
        the excluded ones it meets `aside`."""
        items, weights, picked = self._items, self._weights, self._picked
        total_picked, total_weight = self._total_picked, self._total_weight
        skipped: set[int] = set()
        if exclude:
            is_parked = self._is_parked
            for item in exclude:
                for i in self._index.get(item, ()):
                    if weights[i] and not is_parked[i] and i not in skipped:
                        skipped.add(i)
                        total_picked -= picked[i]
                        total_weight -= weights[i]
        ready, pending = self._ready, self._pending
        chosen = -1
        while total_weight > 0:
            # Jobs whose start time has come (k/w <= total_picked/total_weight) may start.
            while pending:
                i = pending[0][2]
                if picked[i] * total_weight > total_picked * weights[i]:
                    break
                heapq.heappop(pending)
                heapq.heappush(ready, _entry(picked[i] + 1, weights[i], i))
            if not ready:
                break  # not reached: the earliest start among the rest is at most V
            entry = heapq.heappop(ready)
            i = entry[2]
            if i in skipped:
                aside.append(entry)
            elif eligible is not None and not eligible(items[i]):
                self._park(i)
                total_picked -= picked[i]
                total_weight -= weights[i]
            else:
                chosen = i
                break
        return chosen

    def _park(self, i: int) -> None:
        self._parked.append(i)
        self._is_parked[i] = True
        self._total_picked -= self._picked[i]
        self._total_weight -= self._weights[i]

    def _new_predicate(self, eligible: Callable[[T], bool] | None) -> None:
        """Ask every item: park the ones `eligible` refuses, schedule the parked it accepts."""
        self._predicate = eligible
        items, is_parked = self._items, self._is_parked
        back = [i for i in self._parked if eligible is None or eligible(items[i])]
        for i in back:
            is_parked[i] = False
        self._parked = deque(i for i in self._parked if is_parked[i])
        if eligible is not None:
            for heap in (self._ready, self._pending):
                kept = []
                for entry in heap:
                    if eligible(items[entry[2]]):
                        kept.append(entry)
                    else:
                        self._park(entry[2])
                heap[:] = kept
                heapq.heapify(heap)
        self._rejoin(back)

    def _recheck(self, eligible: Callable[[T], bool] | None, count: int) -> None:
        """Ask `count` parked items, in turn, whether they are eligible again."""
        parked, items = self._parked, self._items
        back = []
        for _ in range(min(count, len(parked))):
            i = parked.popleft()
            if eligible is None or eligible(items[i]):
                self._is_parked[i] = False
                back.append(i)
            else:
                parked.append(i)
        self._rejoin(back)

    def _rejoin(self, back: list[int]) -> None:
        """Schedule parked items again at the current virtual time: one that was away gets no
        burst of picks to make up for it (and one that was ahead waits for the others)."""
        if not back:
            return
        weights, picked = self._weights, self._picked
        total_picked, total_weight = self._total_picked, self._total_weight
        if total_weight == 0:  # none stayed: the time before the last ones left
            total_picked, total_weight = self._parked_at
        for i in back:
            picked[i] = max(picked[i], total_picked * weights[i] // total_weight)
            self._total_picked += picked[i]
            self._total_weight += weights[i]
            heapq.heappush(self._pending, _entry(picked[i], weights[i], i))
