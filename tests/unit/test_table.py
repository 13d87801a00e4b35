"""Routing table and the reload plan: diff(old, new, draining) (DESIGN §2 Identity/Removal)."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.config import BackendConfig, RouteConfig
from tcpproxy.table import BackendKey, ListenerPlan, Plan, Table, backend_key, diff

LISTENER_NAMES = ["l1", "l2", "l3"]
BIND_PORTS = [8001, 8002, 8003, 8004]
BACKEND_NAMES = ["a", "b", "c", "d"]
ADDRESSES = ["h1:1000", "h2:1000", "h1:2000"]


def table(*listeners: dict[str, Any]) -> Table:
    return Table.from_config(RouteConfig.model_validate({"listeners": list(listeners)}))


def lst(
    name: str, bind: str, backends: list[tuple[str, str, int]], **options: object
) -> dict[str, Any]:
    return {
        "name": name,
        "bind": bind,
        "backends": [{"name": n, "address": a, "weight": w} for n, a, w in backends],
        **options,
    }


def only(plan: Plan, name: str) -> ListenerPlan:
    (found,) = [p for p in plan.listeners if p.config.name == name]
    return found


def changes(p: ListenerPlan) -> set[str]:
    """The names of the plan's fields that ask for a change."""
    fields = ("added", "readded", "removed", "reweighted", "rebound", "changed_options")
    return {f for f in fields if getattr(p, f)}


def keys_of(name: str, backends: tuple[BackendConfig, ...]) -> set[BackendKey]:
    return {backend_key(name, b) for b in backends}


# -- hypothesis strategies: small pools so old and new overlap -------------------------------


@st.composite
def listener_dicts(draw: st.DrawFn, name: str, port: int) -> dict[str, Any]:
    backends = draw(
        st.dictionaries(
            st.sampled_from(BACKEND_NAMES),
            st.tuples(st.sampled_from(ADDRESSES), st.integers(0, 3)),
            min_size=1,
        )
    )
    order = draw(st.permutations(sorted(backends)))
    out = lst(name, f"127.0.0.1:{port}", [(n, *backends[n]) for n in order])
    if draw(st.booleans()):
        out["drain_timeout"] = draw(st.sampled_from([10, 300]))
    return out


@st.composite
def tables(draw: st.DrawFn) -> Table:
    names = draw(st.lists(st.sampled_from(LISTENER_NAMES), min_size=1, unique=True))
    ports = draw(st.permutations(BIND_PORTS))
    return table(*[draw(listener_dicts(n, p)) for n, p in zip(names, ports, strict=False)])


def all_possible_keys() -> list[BackendKey]:
    return [(lname, b, a) for lname in LISTENER_NAMES for b in BACKEND_NAMES for a in ADDRESSES]


@st.composite
def table_pairs(draw: st.DrawFn) -> tuple[Table, Table, frozenset[BackendKey]]:
    old = draw(tables())
    new = draw(tables())
    # Draining backends were removed by an earlier reload, so they are not in `old`.
    old_keys = old.keys()
    candidates = [k for k in all_possible_keys() if k not in old_keys]
    draining = frozenset(draw(st.sets(st.sampled_from(candidates)))) if candidates else frozenset()
    return old, new, draining


# -- properties ------------------------------------------------------------------------------


@given(tables(), st.sets(st.sampled_from(all_possible_keys())))
def test_diff_with_itself_is_a_noop(t: Table, extra: set[BackendKey]) -> None:
    draining = frozenset(extra - t.keys())

    plan = diff(t, t, draining)

    assert plan.is_noop
    assert all(p.kind == "changed" and p.is_noop for p in plan.listeners)
    assert {p.config.name for p in plan.listeners} == set(t.listeners)
    assert plan.summary() == "no change"


@given(table_pairs())
def test_every_listener_gets_exactly_one_plan(
    pair: tuple[Table, Table, frozenset[BackendKey]],
) -> None:
    old, new, draining = pair

    plan = diff(old, new, draining)

    names = [p.config.name for p in plan.listeners]
    assert len(names) == len(set(names))
    assert set(names) == set(old.listeners) | set(new.listeners)
    for p in plan.listeners:
        if p.config.name not in old.listeners:
            assert p.kind == "added"
        elif p.config.name not in new.listeners:
            assert p.kind == "removed"
        else:
            assert p.kind == "changed"


@given(table_pairs())
def test_backends_of_kept_listeners_are_partitioned(
    pair: tuple[Table, Table, frozenset[BackendKey]],
) -> None:
    old, new, draining = pair

    plan = diff(old, new, draining)

    for p in plan.listeners:
        if p.kind != "changed":
            continue
        name = p.config.name
        before = {backend_key(name, b): b for b in old.listeners[name].backends}
        after = {backend_key(name, b): b for b in new.listeners[name].backends}
        added, readded = keys_of(name, p.added), keys_of(name, p.readded)
        reweighted, removed = keys_of(name, p.reweighted), keys_of(name, p.removed)
        unchanged = {k for k in after if k in before and before[k].weight == after[k].weight}
        groups = [added, readded, reweighted, unchanged]

        # Every key of new is in exactly one group, and the groups hold nothing else.
        for key in after:
            assert sum(key in g for g in groups) == 1, key
        assert set().union(*groups) == set(after)
        assert len(p.added) + len(p.readded) + len(p.reweighted) + len(unchanged) == len(after)
        # Each group is what it claims to be.
        assert added == {k for k in after if k not in before and k not in draining}
        assert readded == {k for k in after if k not in before and k in draining}
        assert reweighted == {
            k for k in after if k in before and before[k].weight != after[k].weight
        }
        for b in p.reweighted:
            assert b.weight == after[backend_key(name, b)].weight
        # Every key of old that is gone is removed, and only those.
        assert removed == set(before) - set(after)
        assert len(p.removed) == len(removed)
        assert p.rebound == (old.listeners[name].bind != new.listeners[name].bind)
        assert p.config == new.listeners[name]


@given(table_pairs())
def test_removed_and_added_listeners(pair: tuple[Table, Table, frozenset[BackendKey]]) -> None:
    old, new, draining = pair

    plan = diff(old, new, draining)

    for p in plan.listeners:
        name = p.config.name
        if p.kind == "removed":
            assert p.config == old.listeners[name]
            assert p.removed == old.listeners[name].backends
            assert changes(p) == {"removed"}
            assert not p.is_noop
        elif p.kind == "added":
            after = keys_of(name, new.listeners[name].backends)
            assert p.config == new.listeners[name]
            assert keys_of(name, p.added) == {k for k in after if k not in draining}
            assert keys_of(name, p.readded) == {k for k in after if k in draining}
            assert changes(p) <= {"added", "readded"}
            assert not p.is_noop


@given(table_pairs())
def test_a_draining_key_that_reappears_is_readded_never_added(
    pair: tuple[Table, Table, frozenset[BackendKey]],
) -> None:
    old, new, draining = pair

    plan = diff(old, new, draining)

    for p in plan.listeners:
        assert not keys_of(p.config.name, p.added) & draining
        assert keys_of(p.config.name, p.readded) <= draining


@given(table_pairs())
def test_summary_is_a_non_empty_line(pair: tuple[Table, Table, frozenset[BackendKey]]) -> None:
    old, new, draining = pair

    summary = diff(old, new, draining).summary()

    assert isinstance(summary, str)
    assert summary.strip()
    assert "\n" not in summary


@given(table_pairs())
def test_noop_exactly_when_nothing_changes(
    pair: tuple[Table, Table, frozenset[BackendKey]],
) -> None:
    old, new, draining = pair

    plan = diff(old, new, draining)

    same = dict(old.listeners) == dict(new.listeners)
    assert plan.is_noop == same
    assert (plan.summary() == "no change") == same


# -- examples ------------------------------------------------------------------------------

BASE = lst("edge", "127.0.0.1:8008", [("v1", "h1:9000", 80), ("v2", "h2:9000", 20)])


def test_table_keys() -> None:
    t = table(BASE, lst("other", "127.0.0.1:8009", [("v1", "h1:9000", 1)]))

    assert t.keys() == {
        ("edge", "v1", "h1:9000"),
        ("edge", "v2", "h2:9000"),
        ("other", "v1", "h1:9000"),
    }
    assert Table().keys() == frozenset()


def test_table_is_immutable() -> None:
    t = table(BASE)

    with pytest.raises(TypeError):
        cast(dict[str, Any], t.listeners)["x"] = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.listeners = {}  # type: ignore[misc]


def test_weight_change_is_a_reweight() -> None:
    new = table(lst("edge", "127.0.0.1:8008", [("v1", "h1:9000", 50), ("v2", "h2:9000", 50)]))

    p = only(diff(table(BASE), new), "edge")

    assert [(b.name, b.weight) for b in p.reweighted] == [("v1", 50), ("v2", 50)]
    assert changes(p) == {"reweighted"}
    assert "reweighted v1,v2" in diff(table(BASE), new).summary()


def test_bind_change_is_a_rebind() -> None:
    new = table({**BASE, "bind": "0.0.0.0:9999"})

    plan = diff(table(BASE), new)
    p = only(plan, "edge")

    assert p.kind == "changed"
    assert p.rebound
    assert changes(p) == {"rebound"}
    assert "0.0.0.0:9999" in plan.summary()


def test_address_change_is_removal_plus_addition() -> None:
    new = table(lst("edge", "127.0.0.1:8008", [("v1", "h1:9001", 80), ("v2", "h2:9000", 20)]))

    p = only(diff(table(BASE), new), "edge")

    assert [(b.name, b.address) for b in p.removed] == [("v1", "h1:9000")]
    assert [(b.name, b.address) for b in p.added] == [("v1", "h1:9001")]
    assert changes(p) == {"added", "removed"}


def test_removed_backend_then_put_back_while_draining_is_readded() -> None:
    without_v2 = table(lst("edge", "127.0.0.1:8008", [("v1", "h1:9000", 100)]))
    first = only(diff(table(BASE), without_v2), "edge")
    assert [b.name for b in first.removed] == ["v2"]
    draining = frozenset(keys_of("edge", first.removed))

    back = only(diff(without_v2, table(BASE), draining), "edge")

    assert [b.name for b in back.readded] == ["v2"]
    assert not back.added
    assert [(b.name, b.weight) for b in back.reweighted] == [("v1", 80)]
    # Without the draining set the same change is a plain addition.
    assert [b.name for b in only(diff(without_v2, table(BASE)), "edge").added] == ["v2"]


def test_draining_key_with_another_address_is_added_not_readded() -> None:
    without_v2 = table(lst("edge", "127.0.0.1:8008", [("v1", "h1:9000", 100)]))
    draining = frozenset({("edge", "v2", "h2:9999")})

    p = only(diff(without_v2, table(BASE), draining), "edge")

    assert [b.name for b in p.added] == ["v2"]
    assert not p.readded


def test_whole_listener_removed_drains_all_its_backends() -> None:
    other = lst("other", "127.0.0.1:8009", [("x", "h3:1", 1)])

    plan = diff(table(BASE, other), table(other))
    p = only(plan, "edge")

    assert p.kind == "removed"
    assert [b.name for b in p.removed] == ["v1", "v2"]
    assert only(plan, "other").is_noop
    assert "removed listener edge" in plan.summary()


def test_new_listener_is_added_with_draining_backends_readded() -> None:
    draining = frozenset({("edge", "v2", "h2:9000")})
    other = lst("other", "127.0.0.1:8009", [("x", "h3:1", 1)])

    plan = diff(table(other), table(other, BASE), draining)
    p = only(plan, "edge")

    assert p.kind == "added"
    assert [b.name for b in p.added] == ["v1"]
    assert [b.name for b in p.readded] == ["v2"]
    assert "added listener edge" in plan.summary()


def test_options_and_backend_order_changes_are_not_noops() -> None:
    slower = table({**BASE, "drain_timeout": "10s"})
    reordered = table(lst("edge", "127.0.0.1:8008", [("v2", "h2:9000", 20), ("v1", "h1:9000", 80)]))

    for new, said in ((slower, "drain_timeout changed"), (reordered, "backend order changed")):
        plan = diff(table(BASE), new)
        p = only(plan, "edge")
        assert p.options_changed
        assert changes(p) == {"changed_options"}
        assert not plan.is_noop
        assert plan.summary() == f"edge: {said}"


def test_the_summary_names_a_rollout_added_changed_or_removed() -> None:
    rollout = {"from": "v1", "to": "v2", "steps": [10, 100], "step_duration": "1m"}
    with_rollout = table({**BASE, "rollout": rollout})
    longer = table({**BASE, "rollout": {**rollout, "step_duration": "2m"}})
    assert diff(table(BASE), with_rollout).summary() == "edge: rollout added"
    assert diff(with_rollout, longer).summary() == "edge: rollout changed"
    assert diff(longer, table(BASE)).summary() == "edge: rollout removed"
    both = table(
        {
            **lst("edge", "127.0.0.1:8008", [("v1", "h1:9000", 70), ("v2", "h2:9000", 30)]),
            "idle_timeout": "5s",
            "rollout": rollout,
        }
    )
    assert diff(table(BASE), both).summary() == (
        "edge: reweighted v1,v2; idle_timeout changed; rollout added"
    )


def test_empty_tables() -> None:
    assert diff(Table(), Table()).is_noop
    assert diff(Table(), Table()).summary() == "no change"
    plan = diff(Table(), table(BASE))
    assert [p.kind for p in plan.listeners] == ["added"]
