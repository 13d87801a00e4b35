"""Smooth weighted round-robin (DESIGN §2 "Selection"): exact shares, smoothness, skipping."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.balancer import PARKED_RECHECK_PICKS, SmoothWeightedRoundRobin

weight_lists = st.lists(st.integers(0, 50), min_size=1, max_size=8).filter(lambda ws: sum(ws) > 0)


def balancer(weights: list[int]) -> SmoothWeightedRoundRobin[int]:
    return SmoothWeightedRoundRobin([(i, w) for i, w in enumerate(weights)])


def picks(bal: SmoothWeightedRoundRobin[int], count: int) -> list[int]:
    out = []
    for _ in range(count):
        item = bal.pick()
        assert item is not None
        out.append(item)
    return out


def assert_every_window_is_exact(sequence: list[int], weights: dict[int, int]) -> None:
    """Each window of sum(weights) consecutive picks holds every item exactly `weight` times."""
    size = sum(weights.values())
    expected = Counter({item: w for item, w in weights.items() if w > 0})
    assert len(sequence) >= size
    window = Counter(sequence[:size])
    assert window == expected
    for start in range(1, len(sequence) - size + 1):
        window[sequence[start - 1]] -= 1
        window[sequence[start + size - 1]] += 1
        assert window == expected, f"window starting at {start}"


@given(weight_lists, st.integers(0, 500))
def test_every_window_gives_each_backend_exactly_its_weight(
    weights: list[int], offset: int
) -> None:
    bal = balancer(weights)
    picks(bal, offset)
    total = sum(weights)

    sequence = picks(bal, 3 * total)

    assert_every_window_is_exact(sequence, dict(enumerate(weights)))


@given(weight_lists, st.integers(0, 200))
def test_weight_zero_is_never_picked(weights: list[int], count: int) -> None:
    zero = {i for i, w in enumerate(weights) if w == 0}

    assert not zero & set(picks(balancer(weights), count))


@given(weight_lists, st.integers(1, 300))
def test_same_inputs_give_the_same_sequence(weights: list[int], count: int) -> None:
    assert picks(balancer(weights), count) == picks(balancer(weights), count)


def test_5_1_1_interleaves() -> None:
    bal = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    one_period = ["a", "b", "a", "a", "c", "a", "a"]

    sequence = [bal.pick() for _ in range(3 * len(one_period))]

    assert sequence == one_period * 3
    # Five a's between two others: runs of three (across periods) are the shortest possible.
    assert "aaaa" not in "".join(str(s) for s in sequence)


@given(weight_lists, st.integers(1, 3))
def test_after_any_number_of_picks_each_share_is_within_one_pick(
    weights: list[int], cycles: int
) -> None:
    total = sum(weights)
    counts: Counter[int] = Counter()

    for t, item in enumerate(picks(balancer(weights), cycles * total), 1):
        counts[item] += 1
        for i, weight in enumerate(weights):
            # |counts[i] - t * weight / total| < 1, in whole numbers
            assert abs(counts[i] * total - t * weight) < total, (i, t)


def runs(sequence: list[int]) -> Iterator[tuple[int, int]]:
    """(item, length) for each run of one item picked again and again."""
    for item, group in itertools.groupby(sequence):
        yield item, sum(1 for _ in group)


@given(weight_lists)
def test_no_run_is_longer_than_the_weights_force_plus_one(weights: list[int]) -> None:
    total = sum(weights)

    for item, length in runs(picks(balancer(weights), 3 * total)):
        weight = weights[item]
        if weight < total:
            # `weight` picks around `total - weight` others: runs of ceil(weight / others)
            # cannot be avoided.
            assert length <= -(-weight // (total - weight)) + 1, (item, length)


def test_equal_weights_alternate_in_order() -> None:
    bal = SmoothWeightedRoundRobin([("a", 1), ("b", 1), ("c", 1)])

    assert [bal.pick() for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_80_20_split_over_100_connections() -> None:
    bal = SmoothWeightedRoundRobin([("v1", 80), ("v2", 20)])

    sequence = [bal.pick() for _ in range(100)]

    assert Counter(sequence) == {"v1": 80, "v2": 20}
    # Smooth: interleaved, never more than 4 v1 picks in a row, never two v2 in a row.
    runs = "".join("1" if s == "v1" else "2" for s in sequence)
    assert "11111" not in runs
    assert "22" not in runs


@given(weight_lists, st.data())
def test_exclude_skips_items_and_the_rest_keep_exact_shares(
    weights: list[int], data: st.DataObject
) -> None:
    excluded = data.draw(st.sets(st.sampled_from(range(len(weights)))))
    remaining = {i: w for i, w in enumerate(weights) if i not in excluded and w > 0}
    bal = balancer(weights)

    if not remaining:
        assert bal.pick(exclude=excluded) is None
        return
    total = sum(remaining.values())
    sequence = [bal.pick(exclude=excluded) for _ in range(2 * total)]

    assert None not in sequence
    assert not excluded & set(sequence)
    assert_every_window_is_exact([s for s in sequence if s is not None], remaining)


@given(weight_lists, st.data())
def test_eligible_skips_items_and_the_rest_keep_exact_shares(
    weights: list[int], data: st.DataObject
) -> None:
    healthy = data.draw(st.sets(st.sampled_from(range(len(weights)))))
    remaining = {i: w for i, w in enumerate(weights) if i in healthy and w > 0}
    bal = balancer(weights)

    if not remaining:
        assert bal.pick(eligible=healthy.__contains__) is None
        return
    total = sum(remaining.values())
    sequence = [bal.pick(eligible=healthy.__contains__) for _ in range(2 * total)]

    assert None not in sequence
    assert set(sequence) <= healthy
    assert_every_window_is_exact([s for s in sequence if s is not None], remaining)


@given(weight_lists, st.data())
def test_exclude_and_eligible_combine(weights: list[int], data: st.DataObject) -> None:
    indices = st.sampled_from(range(len(weights)))
    excluded = data.draw(st.sets(indices))
    healthy = data.draw(st.sets(indices))
    allowed = {i for i, w in enumerate(weights) if w > 0 and i in healthy and i not in excluded}
    bal = balancer(weights)

    for _ in range(sum(weights)):
        item = bal.pick(eligible=healthy.__contains__, exclude=excluded)
        if allowed:
            assert item in allowed
        else:
            assert item is None


def test_pick_returns_none_when_nothing_is_eligible() -> None:
    assert SmoothWeightedRoundRobin[str]([]).pick() is None
    assert SmoothWeightedRoundRobin([("a", 0), ("b", 0)]).pick() is None
    bal = SmoothWeightedRoundRobin([("a", 1), ("b", 2)])
    assert bal.pick(exclude={"a", "b"}) is None
    assert bal.pick(eligible=lambda _: False) is None
    assert bal.pick(eligible=lambda item: item == "a", exclude=("a",)) is None


def test_a_none_pick_does_not_disturb_the_sequence() -> None:
    bal = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    undisturbed = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])

    assert bal.pick(eligible=lambda _: False) is None

    assert [bal.pick() for _ in range(14)] == [undisturbed.pick() for _ in range(14)]


def test_retry_excluding_the_failed_backend_gets_another() -> None:
    bal = SmoothWeightedRoundRobin([("a", 1), ("b", 1), ("c", 1)])
    tried: set[str] = set()

    for _ in range(3):
        item = bal.pick(exclude=tried)
        assert item is not None
        assert item not in tried
        tried.add(item)

    assert tried == {"a", "b", "c"}
    assert bal.pick(exclude=tried) is None


def test_negative_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        SmoothWeightedRoundRobin([("a", 1), ("b", -1)])


def test_items_is_a_copy_in_order() -> None:
    bal = SmoothWeightedRoundRobin([("a", 1), ("b", 0), ("c", 3)])

    items = bal.items
    items.append("z")

    assert bal.items == ["a", "b", "c"]


@given(weight_lists, st.data())
def test_with_eligibility_and_exclusions_changing_every_pick_is_allowed(
    weights: list[int], data: st.DataObject
) -> None:
    indices = st.sampled_from(range(len(weights)))
    up = set(range(len(weights)))
    bal = balancer(weights)

    for _ in range(data.draw(st.integers(1, 100))):
        up ^= data.draw(st.sets(indices, max_size=2))
        excluded = data.draw(st.sets(indices, max_size=2))
        allowed = {i for i, w in enumerate(weights) if w and i in up and i not in excluded}

        item = bal.pick(up.__contains__, excluded)

        if allowed:
            assert item in allowed
        else:
            assert item is None


@given(weight_lists, st.data())
def test_an_item_back_after_a_while_gets_its_share_and_no_burst(
    weights: list[int], data: st.DataObject
) -> None:
    candidates = [i for i, w in enumerate(weights) if w]
    if len(candidates) < 2:
        return
    away = data.draw(st.sampled_from(candidates))
    total = sum(weights)
    up = set(range(len(weights)))
    bal = balancer(weights)
    picks(bal, data.draw(st.integers(0, 2 * total)))
    up.discard(away)
    for _ in range(data.draw(st.integers(1, 5 * total))):
        assert bal.pick(up.__contains__) != away
    up.add(away)
    for _ in range(PARKED_RECHECK_PICKS):  # it is asked again within these
        bal.pick(up.__contains__)

    sequence = [bal.pick(up.__contains__) for _ in range(2 * total)]

    assert abs(sequence.count(away) - 2 * weights[away]) <= 1


def test_a_pick_asks_the_predicate_about_a_few_items_not_all() -> None:
    count = 2000
    bal = balancer([1 + i % 7 for i in range(count)])
    asked = Counter[int]()

    def eligible(item: int) -> bool:
        asked[item] += 1
        return True

    for _ in range(3 * count):
        assert bal.pick(eligible) is not None

    # The first pick asks every item (a new predicate); the rest ask the one they take.
    assert asked.total() <= count + 3 * count


def test_ineligible_items_cost_their_turns_not_every_pick() -> None:
    count = 1000
    down = set(range(0, count, 2))
    bal = balancer([1] * count)
    asked = Counter[int]()

    def eligible(item: int) -> bool:
        asked[item] += 1
        return item not in down

    for _ in range(10 * count):
        assert bal.pick(eligible) not in down

    # Each down item is parked once and asked again in turn: every one of them within
    # PARKED_RECHECK_PICKS picks, about len(down) / PARKED_RECHECK_PICKS a pick.
    per_pick = (asked.total() - count) / (10 * count)
    assert per_pick <= 1 + len(down) / PARKED_RECHECK_PICKS + 1
    assert min(asked[i] for i in down) >= 10 * count // PARKED_RECHECK_PICKS - 1


def test_a_new_predicate_is_honoured_at_once() -> None:
    bal = balancer([1, 1, 1, 1])
    odd = {1, 3}
    even = {0, 2}
    for _ in range(10):
        assert bal.pick(odd.__contains__) in odd
    for _ in range(10):
        assert bal.pick(even.__contains__) in even
    assert Counter(bal.pick() for _ in range(4)) == Counter(range(4))


@given(weight_lists, st.data())
def test_while_a_backend_fails_first_attempts_still_follow_the_weights(
    weights: list[int], data: st.DataObject
) -> None:
    candidates = [i for i, w in enumerate(weights) if w]
    if len(candidates) < 2:
        return
    failing = data.draw(st.sampled_from(candidates))
    bal = balancer(weights)
    first = []

    for _ in range(2 * sum(weights)):
        item = bal.pick()
        assert item is not None
        first.append(item)
        if item == failing:  # its connect failed: the connector retries elsewhere
            assert bal.pick(exclude=[item]) not in (None, failing)

    assert_every_window_is_exact(first, dict(enumerate(weights)))
