"""Client-address hashing: shares follow weights, changes move only the clients that must
move, rollouts are monotone, skipped backends give up only their own clients."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpproxy.affinity import ClientHash, client_key

# 100k client addresses (10.0.0.0 upwards): the shares over them are within SHARE_TOLERANCE
# of weight / sum(weights). A share's standard deviation over 100k keys is at most 0.0016,
# so the tolerance is more than 6 of them.
KEYS = [client_key(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}") for i in range(100_000)]
SHARE_TOLERANCE = 0.01
# Movement is exact (no tolerance), so fewer keys show it as well.
FEW_KEYS = KEYS[:3_000]

weights = st.lists(st.integers(0, 20), min_size=1, max_size=6).filter(lambda ws: sum(ws) > 0)


def hasher(ws: list[int], rollout: tuple[str, str, int] | None = None) -> ClientHash[str]:
    return ClientHash([(f"b{i}", f"b{i}", w) for i, w in enumerate(ws)], rollout)


def mapping(
    h: ClientHash[str],
    keys: list[int],
    eligible: Callable[[str], bool] | None = None,
    exclude: tuple[str, ...] = (),
) -> list[str | None]:
    return [h.pick(key, eligible, exclude) for key in keys]


def assert_minimal(before: list[str | None], after: list[str | None]) -> None:
    """The clients that moved are exactly as many as the change of counts requires: each
    move is one client leaving one backend for another, so no fewer can do."""
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    old, new = Counter(before), Counter(after)
    needed = sum(abs(new[name] - old[name]) for name in old | new) // 2
    assert moved == needed


@settings(max_examples=8)
@given(weights)
def test_shares_follow_the_weights(ws: list[int]) -> None:
    counts = Counter(mapping(hasher(ws), KEYS))
    total = sum(ws)
    for i, w in enumerate(ws):
        assert abs(counts[f"b{i}"] / len(KEYS) - w / total) <= SHARE_TOLERANCE, (i, ws)
    assert None not in counts


@settings(max_examples=30)
@given(weights, st.data())
def test_changing_one_weight_moves_clients_only_to_or_from_it(
    ws: list[int], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(ws) - 1))
    changed = [*ws]
    changed[i] = data.draw(st.integers(0, 20))
    if sum(changed) == 0:
        return
    before, after = mapping(hasher(ws), FEW_KEYS), mapping(hasher(changed), FEW_KEYS)
    for a, b in zip(before, after, strict=True):
        if a != b:
            # Raised: clients come to it from anyone; lowered: only its own leave.
            assert (b == f"b{i}") if changed[i] > ws[i] else (a == f"b{i}")
    assert_minimal(before, after)


@settings(max_examples=30)
@given(weights, st.integers(1, 20), st.data())
def test_adding_or_removing_a_backend_moves_only_its_share(
    ws: list[int], weight: int, data: st.DataObject
) -> None:
    position = data.draw(st.integers(0, len(ws)))
    entries = [(f"b{i}", f"b{i}", w) for i, w in enumerate(ws)]
    grown = [*entries[:position], ("new", "new", weight), *entries[position:]]
    before = mapping(ClientHash(entries), FEW_KEYS)
    after = mapping(ClientHash(grown), FEW_KEYS)
    assert all(b in (a, "new") for a, b in zip(before, after, strict=True))
    assert_minimal(before, after)
    # Removing it again is the same change the other way: everyone else is where they were.
    assert mapping(ClientHash(grown), FEW_KEYS, exclude=("new",)) == before


@settings(max_examples=30)
@given(weights, st.data())
def test_a_skipped_backend_gives_up_only_its_clients_and_gets_them_back(
    ws: list[int], data: st.DataObject
) -> None:
    down = f"b{data.draw(st.integers(0, len(ws) - 1))}"
    h = hasher(ws)
    before = mapping(h, FEW_KEYS)
    skipped = mapping(h, FEW_KEYS, eligible=lambda name: name != down)
    excluded = mapping(h, FEW_KEYS, exclude=(down,))
    without = [(f"b{i}", f"b{i}", w) for i, w in enumerate(ws) if f"b{i}" != down]
    # Its clients go where they would go were it not configured at all; nobody else moves.
    assert skipped == excluded == mapping(ClientHash(without), FEW_KEYS)
    assert all(a in (b, down) for a, b in zip(before, skipped, strict=True))
    # Recovered: the same picks as before (a pick keeps no state).
    assert mapping(h, FEW_KEYS) == before


def test_nothing_to_pick() -> None:
    assert ClientHash[str]([]).pick(KEYS[0]) is None
    assert hasher([0, 0]).pick(KEYS[0]) is None
    assert hasher([1, 1]).pick(KEYS[0], eligible=lambda _: False) is None
    with pytest.raises(ValueError, match="weights must be >= 0"):
        hasher([1, -1])


# -- rollouts: the pair from b0 to b1 is one group; bystanders b2... keep their clients ------

pair_weights = st.tuples(st.integers(0, 10), st.integers(0, 10)).filter(lambda p: sum(p) > 0)
bystanders = st.lists(st.integers(0, 10), max_size=4)
step_sequences = st.lists(st.integers(0, 100), min_size=1, max_size=8, unique=True).map(sorted)


@settings(max_examples=30)
@given(pair_weights, bystanders, step_sequences, st.booleans())
def test_a_rollout_only_ever_moves_clients_from_from_to_to(
    pair: tuple[int, int], others: list[int], steps: list[int], abort: bool
) -> None:
    ws = [*pair, *others]
    plain = mapping(hasher(ws), FEW_KEYS)
    in_pair = {"b0", "b1"}
    previous = None
    for share in steps:
        now = mapping(hasher(ws, ("b0", "b1", share)), FEW_KEYS)
        # Bystanders hold exactly the clients they hold with no rollout.
        assert [b if b not in in_pair else None for b in now] == [
            b if b not in in_pair else None for b in plain
        ]
        if previous is not None:
            assert all(a == b or (a, b) == ("b0", "b1") for a, b in zip(previous, now, strict=True))
        previous = now
    assert previous is not None
    if abort:  # share 0: every `to` client back to `from`, nobody else touched
        aborted = mapping(hasher(ws, ("b0", "b1", 0)), FEW_KEYS)
        assert all(a == b or (a, b) == ("b1", "b0") for a, b in zip(previous, aborted, strict=True))
        assert "b1" not in aborted


@settings(max_examples=8)
@given(pair_weights, bystanders, st.integers(0, 100))
def test_a_rollout_splits_the_pair_by_its_share(
    pair: tuple[int, int], others: list[int], share: int
) -> None:
    ws = [*pair, *others]
    counts = Counter(mapping(hasher(ws, ("b0", "b1", share)), KEYS))
    total = sum(ws)
    pair_share = sum(pair) / total
    assert abs(counts["b1"] / len(KEYS) - pair_share * share / 100) <= SHARE_TOLERANCE
    assert abs(counts["b0"] / len(KEYS) - pair_share * (100 - share) / 100) <= SHARE_TOLERANCE
    for i, w in enumerate(others, start=2):
        assert abs(counts[f"b{i}"] / len(KEYS) - w / total) <= SHARE_TOLERANCE


def test_in_the_pair_the_other_one_takes_over_unless_its_share_is_0() -> None:
    ws = [1, 1, 1]
    for share, down, fallback in ((30, "b1", "b0"), (30, "b0", "b1"), (0, "b0", "b2")):
        h = hasher(ws, ("b0", "b1", share))
        plain = mapping(h, FEW_KEYS)
        skipped = mapping(h, FEW_KEYS, eligible=partial(operator.ne, down))
        for a, b in zip(plain, skipped, strict=True):
            if a == down:
                # With share 0 `to` takes none of the pair's clients: `from`'s go to the
                # next group (b2 is the only other here).
                assert b == fallback
            else:
                assert a == b


# -- the key ----------------------------------------------------------------------------------


def test_a_mapped_ipv4_address_is_the_ipv4_address() -> None:
    assert client_key("::ffff:10.1.2.3") == client_key("10.1.2.3")
    assert client_key("::ffff:a01:203") != client_key("10.1.2.3")  # no dots: IPv6 as written
    assert client_key("10.1.2.3") != client_key("10.1.2.4")


def test_every_process_maps_clients_alike() -> None:
    """A fleet's replicas (and a restarted proxy) agree: nothing depends on the process's
    hash seed."""
    code = (
        "from tcpproxy.affinity import ClientHash, client_key\n"
        "h = ClientHash([(n, n, w) for n, w in (('v1', 80), ('v2', 20), ('v3', 5))],"
        " ('v1', 'v2', 40))\n"
        "print(' '.join(str(h.pick(client_key(f'10.0.0.{i}'))) for i in range(200)))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert set(outputs.pop().split()) == {"v1", "v2", "v3"}
