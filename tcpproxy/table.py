"""Immutable routing table and the reload plan: diff(old, new). Pure: no I/O, no asyncio.

A backend's identity is (listener name, backend name, address): changing an address is a
removal plus an addition. A listener's identity is its name: changing its bind moves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from tcpproxy.config import BackendConfig, ListenerConfig, RouteConfig

BackendKey = tuple[str, str, str]


def backend_key(listener: str, backend: BackendConfig) -> BackendKey:
    return (listener, backend.name, backend.address)


@dataclass(frozen=True, slots=True)
class Table:
    listeners: Mapping[str, ListenerConfig] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_config(cls, config: RouteConfig) -> Table:
        return cls(MappingProxyType({lst.name: lst for lst in config.listeners}))

    def keys(self) -> frozenset[BackendKey]:
        return frozenset(
            backend_key(name, b) for name, lst in self.listeners.items() for b in lst.backends
        )


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """What happens to one listener. `config` is the new config (the old one when removed)."""

    kind: Literal["added", "removed", "changed"]
    config: ListenerConfig
    added: tuple[BackendConfig, ...] = ()
    readded: tuple[BackendConfig, ...] = ()  # draining backends that come back
    removed: tuple[BackendConfig, ...] = ()  # start draining
    reweighted: tuple[BackendConfig, ...] = ()  # new weight, same identity
    rebound: bool = False
    # What else changed, as the log says it: "idle_timeout changed", "rollout added",
    # "backend order changed".
    changed_options: tuple[str, ...] = ()

    @property
    def options_changed(self) -> bool:
        return bool(self.changed_options)

    @property
    def is_noop(self) -> bool:
        return self.kind == "changed" and not (
            self.added
            or self.readded
            or self.removed
            or self.reweighted
            or self.rebound
            or self.options_changed
        )


@dataclass(frozen=True, slots=True)
class Plan:
    listeners: tuple[ListenerPlan, ...]

    @property
    def is_noop(self) -> bool:
        return all(p.is_noop for p in self.listeners)

    def summary(self) -> str:
        parts = []
        for p in self.listeners:
            if p.is_noop:
                continue
            if p.kind != "changed":
                parts.append(f"{p.kind} listener {p.config.name}")
                continue
            bits = [
                f"{verb} {','.join(b.name for b in backends)}"
                for verb, backends in (
                    ("added", p.added),
                    ("re-added", p.readded),
                    ("draining", p.removed),
                    ("reweighted", p.reweighted),
                )
                if backends
            ]
            if p.rebound:
                bits.append(f"moved to {p.config.bind}")
            bits += p.changed_options
            parts.append(f"{p.config.name}: {'; '.join(bits)}")
        return "; ".join(parts) or "no change"


def _changed_options(old: ListenerConfig, new: ListenerConfig) -> tuple[str, ...]:
    """Every option (not backends, not bind) that differs, in words, in field order."""
    before = old.model_dump(exclude={"name", "bind", "backends"})
    after = new.model_dump(exclude={"name", "bind", "backends"})
    out = []
    for key, value in after.items():
        if before[key] == value:
            continue
        if before[key] is None:
            out.append(f"{key} added")
        elif value is None:
            out.append(f"{key} removed")
        else:
            out.append(f"{key} changed")
    # The order is the status page's and the balancer's tie-break: a change is a change.
    kept = {b.name for b in old.backends} & {b.name for b in new.backends}
    if [b.name for b in old.backends if b.name in kept] != [
        b.name for b in new.backends if b.name in kept
    ]:
        out.append("backend order changed")
    return tuple(out)


def diff(old: Table, new: Table, draining: frozenset[BackendKey] = frozenset()) -> Plan:
    """The plan that turns `old` into `new`; `draining` are removed backends still draining."""
    plans: list[ListenerPlan] = []
    for name, lst in new.listeners.items():
        before = old.listeners.get(name)
        old_by_key = (
            {backend_key(name, b): b for b in before.backends} if before is not None else {}
        )
        added: list[BackendConfig] = []
        readded: list[BackendConfig] = []
        reweighted: list[BackendConfig] = []
        for backend in lst.backends:
            key = backend_key(name, backend)
            previous = old_by_key.get(key)
            if previous is None:
                (readded if key in draining else added).append(backend)
            elif previous.weight != backend.weight:
                reweighted.append(backend)
        new_keys = {backend_key(name, b) for b in lst.backends}
        removed = tuple(b for key, b in old_by_key.items() if key not in new_keys)
        if before is None:
            plans.append(ListenerPlan("added", lst, added=tuple(added), readded=tuple(readded)))
            continue
        plans.append(
            ListenerPlan(
                "changed",
                lst,
                added=tuple(added),
                readded=tuple(readded),
                removed=removed,
                reweighted=tuple(reweighted),
                rebound=before.bind != lst.bind,
                changed_options=_changed_options(before, lst),
            )
        )
    for name, lst in old.listeners.items():
        if name not in new.listeners:
            plans.append(ListenerPlan("removed", lst, removed=lst.backends))
    return Plan(tuple(plans))
