"""Route configs the soak writes: a model, its YAML, random changes, and bad files. Pure.

Invariant of every good config: each listener has at least two backends with weight > 0, so
that with one backend down (the soak kills one at a time) a new connection always has a live
backend to go to, and `connect_failed` or `rejected_no_backend` is never a legitimate end.

The two `TIGHT` listeners carry the hostile patterns (slow readers under a short idle timeout,
resets after early replies and after half-closes). Their config is the same in every write
(reloads still go through them) and their backends `HOSTILE_BACKENDS` are never killed, so
that each of those connections has one right outcome.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

BACKEND_NAMES = ("b1", "b2", "b3", "b4")  # the ones chaos kills and config changes move
HOSTILE_BACKENDS = ("h1", "h2")
MAIN = "main"
AUX = "aux"
TIGHT = ("tight", "tight2")  # main's engine, aux's engine
MAX_WEIGHT = 10


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    port: int
    backends: tuple[tuple[str, int], ...]  # (backend name, weight), in file order
    drain_timeout_s: float
    idle_timeout_s: float
    connect_timeout_s: float = 2.0
    engine: str = "copy"  # the relay engine: copy or splice
    # Passive ejection after this many failed connects in a row, for this long.
    ejection_failures: int = 5
    ejection_s: float = 30.0

    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.backends)

    def eligible(self) -> frozenset[str]:
        """Backends that may receive new connections."""
        return frozenset(name for name, weight in self.backends if weight > 0)


@dataclass(frozen=True)
class RouteSpec:
    listeners: tuple[ListenerSpec, ...]

    def get(self, name: str) -> ListenerSpec | None:
        for lst in self.listeners:
            if lst.name == name:
                return lst
        return None

    def ports(self) -> frozenset[int]:
        return frozenset(lst.port for lst in self.listeners)

    def without(self, name: str) -> RouteSpec:
        return RouteSpec(tuple(lst for lst in self.listeners if lst.name != name))

    def with_listener(self, spec: ListenerSpec) -> RouteSpec:
        others = [lst for lst in self.listeners if lst.name != spec.name]
        ordered = sorted([*others, spec], key=lambda lst: lst.name != MAIN)
        return RouteSpec(tuple(ordered))


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def render(spec: RouteSpec, addresses: Mapping[str, str], serial: int) -> str:
    """The YAML file; `serial` makes every write's bytes (hence sha256) unique."""
    lines = [f"# tcpproxy soak, write {serial}", "listeners:"]
    for lst in spec.listeners:
        lines += [
            f"  - name: {lst.name}",
            f'    bind: "127.0.0.1:{lst.port}"',
            "    backends:",
        ]
        for name, weight in lst.backends:
            lines += [
                f"      - name: {name}",
                f'        address: "{addresses[name]}"',
                f"        weight: {weight}",
            ]
        lines += [
            f"    drain_timeout: {_duration(lst.drain_timeout_s)}",
            f"    idle_timeout: {_duration(lst.idle_timeout_s)}",
            f"    connect_timeout: {_duration(lst.connect_timeout_s)}",
        ]
        lines += [
            "    ejection:",
            f"      consecutive_failures: {lst.ejection_failures}",
            f"      duration: {_duration(lst.ejection_s)}",
        ]
        if lst.engine != "copy":
            lines.append(f"    engine: {lst.engine}")
    return "\n".join(lines) + "\n"


def _weights(rng: random.Random, names: list[str]) -> tuple[tuple[str, int], ...]:
    """Random weights with at least two positive ones (names has at least two)."""
    while True:  # bounded in practice: P(fewer than two positive) < 0.2 per try
        weights = [rng.choice([0, *range(1, MAX_WEIGHT + 1)]) for _ in names]
        if sum(1 for w in weights if w > 0) >= 2:
            return tuple(zip(names, weights, strict=True))


@dataclass(frozen=True)
class Change:
    spec: RouteSpec
    what: str


def random_listener(rng: random.Random, template: ListenerSpec, port: int) -> ListenerSpec:
    """The template's listener on `port` with a random set of backends and weights."""
    names = sorted(rng.sample(BACKEND_NAMES, rng.randint(2, len(BACKEND_NAMES))))
    return replace(template, port=port, backends=_weights(rng, names))


def mutate(
    spec: RouteSpec,
    rng: random.Random,
    aux_ports: tuple[int, int],
    aux_template: ListenerSpec,
) -> Change:
    """One random change of the kinds an operator makes: weights, remove/re-add a backend,
    remove/re-add/move the aux listener."""
    aux = spec.get(AUX)
    roll = rng.random()
    if aux is None and roll < 0.5:
        port = rng.choice(aux_ports)
        added = random_listener(rng, aux_template, port)
        return Change(spec.with_listener(added), f"add listener aux on :{port}")
    if aux is not None and roll < 0.08:
        return Change(spec.without(AUX), "remove listener aux")
    if aux is not None and roll < 0.14:
        port = aux_ports[1] if aux.port == aux_ports[0] else aux_ports[0]
        return Change(spec.with_listener(replace(aux, port=port)), f"move aux to :{port}")
    target = spec.get(MAIN) if aux is None or rng.random() < 0.65 else aux
    assert target is not None
    present = [name for name, _ in target.backends]
    absent = [name for name in BACKEND_NAMES if name not in present]
    kind = rng.random()
    if kind < 0.3 and len(present) > 2:
        gone = rng.choice(present)
        rest = [b for b in target.backends if b[0] != gone]
        if sum(1 for _, w in rest if w > 0) < 2:
            rest = list(_weights(rng, [n for n, _ in rest]))
        changed = replace(target, backends=tuple(rest))
        return Change(spec.with_listener(changed), f"{target.name}: remove {gone}")
    if kind < 0.6 and absent:
        back = rng.choice(absent)
        weight = rng.randint(1, MAX_WEIGHT)
        backends = tuple(sorted([*target.backends, (back, weight)]))
        changed = replace(target, backends=backends)
        return Change(spec.with_listener(changed), f"{target.name}: add {back} w={weight}")
    changed = replace(target, backends=_weights(rng, present))
    text = ",".join(f"{n}={w}" for n, w in changed.backends)
    return Change(spec.with_listener(changed), f"{target.name}: weights {text}")


BAD_KINDS = (
    "yaml_syntax",
    "negative_weight",
    "unknown_key",
    "empty",
    "truncated",
    "duplicate_backend",
    "port_in_use",
    "no_backends",
)


def bad_file(kind: str, good_text: str, serial: int, busy_port: int) -> str:
    """A file the proxy must reject; `good_text` is a valid file it is derived from."""
    head = f"# tcpproxy soak, bad write {serial} ({kind})\n"
    body = good_text.split("\n", 1)[1]
    if kind == "yaml_syntax":
        return head + body.replace("backends:", "backends: [", 1)
    if kind == "negative_weight":
        # Not a sign in front of the weight: `-0` would be a valid 0.
        return head + re.sub(r"weight: \d+", "weight: -1", body, count=1)
    if kind == "unknown_key":
        return head + body.replace("weight: ", "weigth: ", 1)
    if kind == "empty":
        return ""
    if kind == "truncated":
        # Cut inside the first quoted address: an unterminated string, as a half-written
        # file would be; never a shorter valid config.
        cut = body.index('address: "') + len('address: "127.0')
        return head + body[:cut]
    if kind == "duplicate_backend":
        first = body.index("      - name: ")
        end = body.index("      - name: ", first + 1)
        return head + body[:end] + body[first:end] + body[end:]
    if kind == "port_in_use":
        # A new listener on a port a backend already listens on: the bind fails, and the
        # whole reload with it.
        extra = (
            "  - name: clash\n"
            f'    bind: "127.0.0.1:{busy_port}"\n'
            "    backends:\n"
            "      - name: x\n"
            f'        address: "127.0.0.1:{busy_port}"\n'
        )
        return head + body + extra
    if kind == "no_backends":
        return head + 'listeners:\n  - name: main\n    bind: "127.0.0.1:1"\n    backends: []\n'
    raise ValueError(kind)
