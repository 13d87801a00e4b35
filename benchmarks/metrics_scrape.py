"""/metrics with many backends: scrape time, size, and what a scrape costs the data plane.

Runs `tcpproxy run` as a process in front of one `tcpproxy echo`, with a listener of
--backends backends (each reached once, so that each has its series and its duration
histogram) and a `probe` listener with one held connection. A client echoes one line after
another through the probe connection while /metrics is scraped (plain, then gzip): the
longest echo round trip during a scrape is how long the data plane stood still. With
`--baseline REV` the same is measured, in the same run, for the proxy as it was at git
revision REV. Run from the repository root:

    python benchmarks/metrics_scrape.py [--backends 10000] [--scrapes 3] [--baseline REV]
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
READY_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(what: str, predicate: object, timeout: float = READY_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def config(backends: int, many: int, probe: int, echo: str) -> str:
    lines = ["listeners:", "  - name: many", f'    bind: "{HOST}:{many}"', "    backends:"]
    lines += [f'      - {{name: b{i}, address: "{echo}", weight: 1}}' for i in range(backends)]
    lines += ["  - name: probe", f'    bind: "{HOST}:{probe}"', "    backends:"]
    lines += [f'      - {{name: p, address: "{echo}", weight: 1}}']
    return "\n".join(lines) + "\n"


@contextmanager
def process(argv: list[str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def greet(port: int) -> None:
    with socket.create_connection((HOST, port), timeout=30) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                raise SystemExit("a connection through the proxy closed before its greeting")
            data += chunk


def echo_once(sock: socket.socket) -> float:
    started = time.perf_counter()
    sock.sendall(b"ping\n")
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(100)
    return time.perf_counter() - started


def scrape(url: str, zipped: bool, result: list[tuple[float, int, int]]) -> None:
    """Appends (seconds, bytes on the wire, bytes of text) to `result`."""
    headers = {"Accept-Encoding": "gzip"} if zipped else {}
    request = urllib.request.Request(url, headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read()
        encoding = response.headers.get("Content-Encoding")
    elapsed = time.perf_counter() - started
    text = gzip.decompress(body) if encoding == "gzip" else body
    result.append((elapsed, len(body), len(text)))


def measure(name: str, source: Path, backends: int, scrapes: int) -> dict[str, float]:
    echo_port, many, probe, admin = free_port(), free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="metrics-scrape-"))
    path = work / "tcpproxy.yaml"
    path.write_text(config(backends, many, probe, f"{HOST}:{echo_port}"))
    python = [sys.executable, "-m", "tcpproxy"]
    echo = [*python, "echo", "--listen", f"{HOST}:{echo_port}", "--name", "e"]
    run = [
        *python, "run", "--config", str(path), "--admin", f"{HOST}:{admin}",
        "--no-access-log", "--log-level", "warning", "--no-watch", "--poll-interval", "0",
    ]  # fmt: skip
    with process(echo, REPO), process(run, source) as proxy:
        wait_for("the proxy", lambda: http_ok(f"http://{HOST}:{admin}/readyz"))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: greet(many), range(backends)))
        url = f"http://{HOST}:{admin}/metrics"
        with socket.create_connection((HOST, probe), timeout=120) as sock:
            sock.recv(100)  # the greeting
            # Without a scrape, for as long as one takes: how still the loop is anyway.
            idle, until = [], time.monotonic() + 1.0
            while time.monotonic() < until:
                idle.append(echo_once(sock))
            out: dict[str, float] = {
                "echo_idle_p50_ms": statistics.median(idle) * 1e3,
                "echo_idle_max_ms": max(idle) * 1e3,
            }
            for zipped in (False, True):
                kind = "gzip" if zipped else "plain"
                times, stalls, p50s = [], [], []
                for _ in range(scrapes):
                    result: list[tuple[float, int, int]] = []
                    thread = threading.Thread(target=scrape, args=(url, zipped, result))
                    thread.start()
                    rtts = []
                    while thread.is_alive():
                        rtts.append(echo_once(sock))
                    thread.join()
                    seconds, wire, text = result[0]
                    times.append(seconds)
                    stalls.append(max(rtts))
                    p50s.append(statistics.median(rtts))
                out[f"{kind}_scrape_s"] = statistics.median(times)
                out[f"{kind}_bytes"] = wire
                out[f"{kind}_echo_max_ms"] = max(stalls) * 1e3
                out[f"{kind}_echo_p50_ms"] = statistics.median(p50s) * 1e3
                out["text_bytes"] = text
        if proxy.poll() is not None:
            raise SystemExit(f"{name}: the proxy exited with {proxy.returncode}")
    return out


def source_at(revision: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="metrics-scrape-src-"))
    archive = subprocess.run(
        ["git", "archive", revision, "tcpproxy"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also measure the proxy at REV")
    args = parser.parse_args()
    targets = [("now", REPO)]
    if args.baseline:
        targets.append((args.baseline[:10], source_at(args.baseline)))
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, {platform.node()}; "
        f"{args.backends} backends, {args.scrapes} scrapes of each kind"
    )
    results = {name: measure(name, source, args.backends, args.scrapes) for name, source in targets}
    rows = [
        ("text size (MB)", "text_bytes", 1e-6),
        ("gzip size (MB)", "gzip_bytes", 1e-6),
        ("plain scrape (s)", "plain_scrape_s", 1),
        ("gzip scrape (s)", "gzip_scrape_s", 1),
        ("echo p50, no scrape (ms)", "echo_idle_p50_ms", 1),
        ("echo max, no scrape, 1 s (ms)", "echo_idle_max_ms", 1),
        ("echo max during plain scrape (ms)", "plain_echo_max_ms", 1),
        ("echo p50 during plain scrape (ms)", "plain_echo_p50_ms", 1),
        ("echo max during gzip scrape (ms)", "gzip_echo_max_ms", 1),
        ("echo p50 during gzip scrape (ms)", "gzip_echo_p50_ms", 1),
    ]
    print(f"{'':36}" + "".join(f"{name:>14}" for name in results))
    for label, key, scale in rows:
        print(f"{label:36}" + "".join(f"{r[key] * scale:>14.3f}" for r in results.values()))


if __name__ == "__main__":
    main()
