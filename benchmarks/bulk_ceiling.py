"""How fast can any relay carry one iperf3 stream on this machine? A reference for the bulk
target, not a target of tcpproxy's.

    python benchmarks/bulk_ceiling.py [--rounds N] [--seconds S]

Runs iperf3 in interleaved rounds directly, through HAProxy (as bench.py configures it) and
through the leanest relay Python can express: one thread per direction, blocking os.splice
through a 1 MiB pipe, no event loop, bytes never in user space. On a 2-core machine the
iperf3 client, the iperf3 server and the relay share two cores; if this relay is no faster
than HAProxy, no event-loop proxy in Python will be 1.2x HAProxy here either.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tcpbench.peers import which
from tcpbench.procs import HOST, Processes, free_port, run_checked
from tcpbench.targets import haproxy_config

PIPE_SIZE_BYTES = 1 << 20


def _pump(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE_BYTES)
        while n := os.splice(src.fileno(), w, PIPE_SIZE_BYTES):
            while n:
                n -= os.splice(r, dst.fileno(), n)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)


def serve_relay(listen_port: int, backend_port: int) -> None:
    """Run the thread-per-direction splice relay until killed."""
    server = socket.create_server((HOST, listen_port))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection((HOST, backend_port))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def iperf3(port: int, seconds: int) -> float:
    argv = [which("iperf3") or "iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"]
    data = json.loads(run_checked(argv, timeout=seconds + 30).stdout)
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--relay", nargs=2, type=int, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.relay:
        serve_relay(*args.relay)
        return 0
    with tempfile.TemporaryDirectory(prefix="bulk-ceiling-") as tmp:
        procs = Processes(Path(tmp))
        try:
            backend = free_port()
            procs.start("iperf3-server", [which("iperf3") or "iperf3", "-s", "-B", HOST,
                                          "-p", str(backend)]).wait_ready([backend])  # fmt: skip
            ports = {"direct": backend, "haproxy": free_port(), "splice relay": free_port()}
            cfg = Path(tmp) / "haproxy.cfg"
            cfg.write_text(haproxy_config({"bulk": backend}, {"bulk": ports["haproxy"]}))
            procs.start("haproxy", [which("haproxy") or "haproxy", "-db", "-f", str(cfg)])
            relay_argv = [sys.executable, __file__, "--relay", str(ports["splice relay"]),
                          str(backend)]  # fmt: skip
            procs.start("relay", relay_argv).wait_ready([ports["splice relay"]])
            samples: dict[str, list[float]] = {name: [] for name in ports}
            for i in range(args.rounds):
                for name, port in ports.items():
                    samples[name].append(iperf3(port, args.seconds))
                print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {s[-1]:.2f}" for n, s in samples.items()), flush=True)  # fmt: skip
        except (OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            print(f"bulk_ceiling: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    haproxy = statistics.median(samples["haproxy"])
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:>13}: {median:6.2f} Gbit/s  {median / haproxy:.2f}x HAProxy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
