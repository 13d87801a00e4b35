"""Reload latency: config file written -> new connections follow the new weights.

Uses the real reloader (directory watch) on a real proxy; prints median and max over 20
flips. Run from the repository root: `python benchmarks/reload_latency.py`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import (
    Backends,
    Client,
    LoopThread,
    RunningProxy,
    config_yaml,
    free_port,
    listener_yaml,
)


def main() -> None:
    t = LoopThread()
    b = Backends(t)
    v1, v2 = b.start("v1"), b.start("v2")
    port = free_port()
    d = Path(tempfile.mkdtemp())
    p = d / "tcpproxy.yaml"

    def cfg(w1: int, w2: int) -> str:
        return config_yaml(listener_yaml("app", port, {"v1": (v1, w1), "v2": (v2, w2)}))

    p.write_text(cfg(1, 0))
    r = RunningProxy(t, p)
    r.watch()
    lat = []
    for i in range(20):
        w = (0, 1) if i % 2 == 0 else (1, 0)
        want = "v2" if i % 2 == 0 else "v1"
        t0 = time.monotonic()
        r.write_config(cfg(*w))
        while True:
            c = Client(port)
            got = c.greeting()
            c.close()
            if got == want:
                break
        lat.append((time.monotonic() - t0) * 1000)
        time.sleep(0.2)
    print(
        f"write -> new connections on new weights: median {statistics.median(lat):.0f} ms, "
        f"max {max(lat):.0f} ms over {len(lat)} flips"
    )
    r.shutdown()
    b.close()
    t.stop()


if __name__ == "__main__":
    main()
