"""Balancer micro-benchmark: the cost of one pick, as the connector makes it, by backend count.

Each pick is what a new connection costs the balancer: `pick(Backend.eligible, exclude)` on
real Backend objects, with nothing excluded, and as a retry excluding the backend that just
failed. Also with 1% and 50% of the backends failing their health checks, since skipping
costs something. Prints microseconds per pick (the best of 5 runs, after a cycle of picks)
and, with `--baseline REV`, the same for balancer.py as it was at git revision REV, measured
in the same run, and the ratio. Run from the repository root:

    python benchmarks/balancer_pick.py [--counts 10,100,10000] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcpproxy.backend import Backend
from tcpproxy.balancer import SmoothWeightedRoundRobin
from tcpproxy.config import BackendConfig

REPO = Path(__file__).resolve().parents[1]
RUNS = 5
RUN_S = 0.1
WARM_UP_S = 5.0


def backends(count: int, weights: str) -> list[Backend]:
    rng = random.Random(count)
    out = []
    for i in range(count):
        weight = 1 if weights == "equal" else rng.randint(1, 100)
        config = BackendConfig(
            name=f"b{i}", address=f"10.0.{i // 250}.{i % 250 + 1}:9000", weight=weight
        )
        out.append(Backend("bench", config))
    return out


def balancer_at(revision: str) -> Any:
    """SmoothWeightedRoundRobin from tcpproxy/balancer.py at a git revision."""
    source = subprocess.run(
        ["git", "show", f"{revision}:tcpproxy/balancer.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_balancer.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_balancer", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SmoothWeightedRoundRobin


def per_pick_us(cls: Any, items: list[Backend], retry: bool) -> float:
    """Microseconds a pick, in the steady state: after a whole cycle of picks (sum of the
    weights) where that takes under WARM_UP_S, then runs of about RUN_S each."""
    balancer = cls([(b, b.weight) for b in items])
    eligible = Backend.eligible

    def run(picks: int) -> float:
        started = time.perf_counter()
        if retry:
            for _ in range(picks):
                first = balancer.pick(eligible)
                balancer.pick(eligible, (first,))
        else:
            for _ in range(picks):
                balancer.pick(eligible)
        return (time.perf_counter() - started) / (picks * (2 if retry else 1))

    probe = run(20)
    cycle = sum(b.weight for b in items)
    if probe * cycle < WARM_UP_S:
        run(cycle)
    picks = max(20, int(RUN_S / probe))
    return min(run(picks) for _ in range(RUNS)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="10,100,10000")
    parser.add_argument("--baseline", metavar="REV", help="also measure balancer.py at REV")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    targets: list[tuple[str, Any]] = [("now", SmoothWeightedRoundRobin)]
    if args.baseline:
        targets.append((args.baseline[:10], balancer_at(args.baseline)))
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.node()}")
    columns = "".join(f" {name + ' pick':>13} {name + ' retry':>13}" for name, _ in targets)
    ratio = f" {'baseline/now':>13}" if args.baseline else ""
    print(f"{'backends':>9} {'weights':>7} {'unhealthy':>9}{columns}{ratio}   (µs per pick)")
    for count in counts:
        for weights in ("equal", "mixed"):
            for unhealthy in (0.0, 0.01, 0.5):
                items = backends(count, weights)
                for b in random.Random(7).sample(items, int(count * unhealthy)):
                    b.healthy = False
                figures = []
                for _, cls in targets:
                    for b in items:
                        b.ejected = False  # nothing a previous target did carries over
                    figures.append(per_pick_us(cls, items, retry=False))
                    figures.append(per_pick_us(cls, items, retry=True))
                line = "".join(f" {f:>13.2f}" for f in figures)
                if args.baseline:
                    line += f" {figures[2] / figures[0]:>12.1f}x"
                print(f"{count:>9} {weights:>7} {unhealthy:>9.0%}{line}")


if __name__ == "__main__":
    main()
