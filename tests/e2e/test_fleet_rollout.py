"""One rollout across a fleet: three `tcpproxy run` processes share one rollout block, and a
real Prometheus (Debian's) scrapes them every second. The replicas agree through the file
(pause, resume) and through Prometheus (abort), and carry on by themselves when it is gone.

Every wait polls state in another process with a generous deadline: nothing assumes how
fast this machine is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.processes import EXIT_S, REPO, START_S, TCPPROXY, http
from tests.harness import Client, free_port, wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
# Each replica's judge asks this often; Prometheus scrapes every second.
JUDGE_INTERVAL = "1s"
# Far above a loopback query's time even on a slow machine: the tests that count no failed
# query must not see a slow answer as an outage.
JUDGE_TIMEOUT = "5s"


@dataclass
class Replica:
    name: str
    directory: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.directory / f"{self.name}.yaml"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [
                    *TCPPROXY,
                    "run",
                    "--config",
                    str(self.config),
                    "--admin",
                    f"127.0.0.1:{self.admin_port}",
                    "--no-access-log",
                ],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_until(
            lambda: http(f"http://127.0.0.1:{self.admin_port}/readyz")[0] == 200,
            timeout=START_S,
            what=f"{self.name} ready",
        )

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            assert self.popen.wait(EXIT_S) == 0, self.log.read_text()

    def status(self) -> dict[str, Any]:
        code, body = http(f"http://127.0.0.1:{self.admin_port}/status")
        assert code == 200, body
        listener: dict[str, Any] = json.loads(body)["listeners"][0]
        return listener

    def rollout(self) -> dict[str, Any]:
        rollout: dict[str, Any] = self.status()["rollout"]
        return rollout

    def connections_to(self, backend: str) -> int:
        return sum(
            int(b["total_connections"]) for b in self.status()["backends"] if b["name"] == backend
        )

    def metric(self, name: str) -> float | None:
        code, body = http(f"http://127.0.0.1:{self.admin_port}/metrics")
        assert code == 200
        for line in body.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


def rollout_yaml(
    replica: Replica, to_address: str, from_address: str, block: str, extra: str = ""
) -> str:
    return f"""\
listeners:
  - name: app
    bind: "127.0.0.1:{replica.port}"
    backends:
      - {{name: v1, address: "{from_address}", weight: 1}}
      - {{name: v2, address: "{to_address}", weight: 0}}
{extra}    rollout:
{block}"""


def rollout_block(
    prometheus: str, steps: str = "[50, 100]", duration: str = "1h", on_unhealthy: bool = True
) -> str:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return f"""\
      from: v1
      to: v2
      steps: {steps}
      step_duration: {duration}
      started_at: "{started}"
      abort:
        window: 30s
        on_unhealthy: {str(on_unhealthy).lower()}
        prometheus:
          url: "{prometheus}"
          interval: {JUDGE_INTERVAL}
          timeout: {JUDGE_TIMEOUT}
"""


class PrometheusServer:
    def __init__(self, directory: Path, targets: list[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "tcpproxy",
                            "static_configs": [
                                {"targets": [f"127.0.0.1:{port}" for port in targets]}
                            ],
                        }
                    ],
                }
            )
        )
        self.log = (directory / "prometheus.log").open("ab")
        self.popen = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        wait_until(
            lambda: http(f"{self.url}/-/ready")[0] == 200, timeout=START_S, what="prometheus"
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        code, body = http(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert code == 200, body
        result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return result

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(EXIT_S)
        self.log.close()


@dataclass
class Fleet:
    directory: Path
    replicas: list[Replica]
    prometheus: PrometheusServer
    backends: dict[str, str]

    def write(
        self, block: str, to: Callable[[Replica], str] | None = None, extra: str = ""
    ) -> None:
        """The same rollout block in every replica's file (a ConfigMap they all mount)."""
        for replica in self.replicas:
            address = to(replica) if to else self.backends["v2"]
            text = rollout_yaml(replica, address, self.backends["v1"], block, extra)
            tmp = replica.config.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, replica.config)  # one rename: a reader sees all of it or none


@pytest.fixture
def fleet(tmp_path: Path, echo_backends: dict[str, str]) -> Iterator[Fleet]:
    replicas = [Replica(name, tmp_path) for name in ("a", "b", "c")]
    prometheus = PrometheusServer(tmp_path, [r.admin_port for r in replicas])
    fleet = Fleet(tmp_path, replicas, prometheus, echo_backends)
    try:
        yield fleet
    finally:
        for replica in fleet.replicas:
            replica.stop()
        prometheus.stop()


class Traffic:
    """New connections to each replica, one after another, until told to stop: each reads
    the greeting of the backend it reached."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.stop = threading.Event()
        self.greetings: dict[str, dict[str, int]] = {r.name: {} for r in replicas}
        self.threads = [threading.Thread(target=self._run, args=(r,)) for r in replicas]
        for thread in self.threads:
            thread.start()

    def _run(self, replica: Replica) -> None:
        seen = self.greetings[replica.name]
        while not self.stop.is_set():
            client = Client(replica.port)
            try:
                greeting = client.greeting()
            finally:
                client.close()
            seen[greeting] = seen.get(greeting, 0) + 1

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(EXIT_S)


def aborted_at(replicas: list[Replica], timeout: float) -> dict[str, float]:
    """When each replica was first seen aborted (polled every 50 ms)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(replicas):
        assert time.monotonic() < deadline, f"only {sorted(seen)} aborted"
        for replica in replicas:
            if replica.name not in seen and replica.rollout()["state"] == "aborted":
                seen[replica.name] = time.monotonic()
        time.sleep(0.05)
    return seen


def test_one_replicas_failing_backend_aborts_every_replica_and_a_later_one_starts_aborted(
    fleet: Fleet,
) -> None:
    """v2 refuses connections only from replica a: a ejects it and aborts; b and c, whose
    own connects to v2 all succeed, abort on a's report through Prometheus. A replica
    started after that starts aborted and sends nothing to v2."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    block = rollout_block(fleet.prometheus.url)
    fleet.write(block, to=lambda r: dead if r.name == "a" else fleet.backends["v2"])
    for replica in fleet.replicas:
        replica.start()
    traffic = Traffic(fleet.replicas)
    try:
        times = aborted_at(fleet.replicas, timeout=120)
    finally:
        traffic.end()
    first, last = min(times.values()), max(times.values())
    print(f"\nfleet abort: first replica {min(times, key=times.__getitem__)}, "
          f"last {last - first:.2f}s later")  # fmt: skip
    # b and c sent some connections to v2 before the abort: they did not trip on their own.
    assert fleet.replicas[1].connections_to("v2") > 0
    for replica in fleet.replicas[1:]:
        assert "another replica aborted this rollout" in str(replica.rollout()["reason"])
    for replica in fleet.replicas:  # both queries parsed and answered every time
        assert replica.metric("tcpproxy_rollout_prometheus_errors_total") == 0
    identity = fleet.replicas[0].rollout()["id"]
    reported = fleet.prometheus.query(f'tcpproxy_rollout_aborted{{rollout="{identity}"}} == 1')
    assert reported  # what the later replica will ask for

    # The fleet's view, as Prometheus last scraped it: every replica aborted.
    def fleet_view() -> str:
        out = subprocess.run(
            [*TCPPROXY, "rollout", "status", "--prometheus", fleet.prometheus.url, "--window=1m"],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout

    wait_until(lambda: fleet_view().count(" aborted ") == 3, timeout=60, what="fleet view")
    view = fleet_view()
    print(view)
    assert view.startswith(f"app: rollout {identity}: v1 -> v2\n")
    for replica in fleet.replicas:
        assert f"127.0.0.1:{replica.admin_port}" in view
    assert "of the pair's new connections to v2" in view

    late = Replica("d", fleet.directory)
    late.config.write_text(rollout_yaml(late, fleet.backends["v2"], fleet.backends["v1"], block))
    fleet.replicas.append(late)
    late.start()
    wait_until(lambda: late.rollout()["state"] == "aborted", timeout=60, what="d aborted")
    traffic = Traffic([late])
    try:
        wait_until(lambda: sum(traffic.greetings["d"].values()) >= 20, timeout=60, what="d used")
    finally:
        traffic.end()
    assert late.connections_to("v2") == 0
    assert set(traffic.greetings["d"]) == {"v1"}


def test_the_fleets_failure_ratio_aborts_replicas_whose_own_connects_succeed(
    fleet: Fleet,
) -> None:
    """No ejection, no health judgement: only the default query, summed over the three
    replicas (a third of the attempts to v2 fail), decides, and it decides for all."""
    dead = f"127.0.0.1:{free_port()}"
    block = rollout_block(fleet.prometheus.url, on_unhealthy=False)
    fleet.write(
        block,
        to=lambda r: dead if r.name == "a" else fleet.backends["v2"],
        extra="    ejection: null\n",
    )
    for replica in fleet.replicas:
        replica.start()
    traffic = Traffic(fleet.replicas)
    try:
        aborted_at(fleet.replicas, timeout=120)
    finally:
        traffic.end()
    reasons = [str(r.rollout()["reason"]) for r in fleet.replicas]
    assert any("of the fleet's connection attempts to v2 failed" in r for r in reasons), reasons
    assert all("Prometheus" in r for r in reasons), reasons
    for replica in fleet.replicas:
        assert replica.metric("tcpproxy_rollout_prometheus_errors_total") == 0


def test_a_pause_in_the_file_holds_every_replica_on_one_step_and_resume_moves_them_together(
    fleet: Fleet,
) -> None:
    block = rollout_block(fleet.prometheus.url, steps="[10, 50, 100]")
    fleet.write(block)
    for replica in fleet.replicas:
        replica.start()
    first = fleet.replicas[0]
    boundaries = {r.rollout()["next_step_at"] for r in fleet.replicas}
    assert len({round(float(b), 3) for b in boundaries}) == 1

    # One edit, by the CLI, of the file every replica reads.
    out = subprocess.run(
        [*TCPPROXY, "rollout", "pause", "--config", str(first.config)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "paused at" in out.stdout
    assert "kubectl patch configmap tcpproxy-routes --type merge -p " in out.stdout
    paused = first.config.read_text()
    assert "paused_at:" in paused
    assert paused.startswith("listeners:\n  - name: app\n")  # the file's own layout kept
    shared = paused.split("    rollout:\n", 1)[1]
    fleet.write(shared)

    def all_in(state: str) -> bool:
        return all(r.rollout()["state"] == state for r in fleet.replicas)

    wait_until(partial(all_in, "paused"), timeout=60, what="all paused")
    steps = {r.rollout()["step"] for r in fleet.replicas}
    assert steps == {1}
    assert {r.rollout()["next_step_in_s"] for r in fleet.replicas} == {None}

    out = subprocess.run(
        [*TCPPROXY, "rollout", "resume", "--config", str(first.config)],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    resumed = first.config.read_text()
    assert "paused_at:" not in resumed
    assert "paused_for:" in resumed
    fleet.write(resumed.split("    rollout:\n", 1)[1])
    wait_until(partial(all_in, "running"), timeout=60, what="all running again")
    after = [r.rollout() for r in fleet.replicas]
    # Every replica's next step is at one instant: the start, plus the paused time from
    # the file, plus one step.
    assert len({round(float(r["next_step_at"]), 3) for r in after}) == 1
    paused_for = float(after[0]["paused_for_s"])
    assert paused_for > 0
    expected = float(after[0]["started_at"]) + paused_for + 3600
    assert abs(float(after[0]["next_step_at"]) - expected) < 1e-3


def judge_up(replica: Replica) -> bool:
    return replica.metric("tcpproxy_rollout_prometheus_up") == 1


def judge_failed(replica: Replica, times: int) -> bool:
    return (replica.metric("tcpproxy_rollout_prometheus_errors_total") or 0) >= times


def moved_past(replica: Replica, step: int) -> bool:
    return int(replica.rollout()["step"]) > step


def test_prometheus_gone_mid_rollout_neither_aborts_nor_stalls_it(fleet: Fleet) -> None:
    """Twenty steps of 5 s: after Prometheus stopped, each replica moves on to a later
    step by its own clock, does not abort, and logs the outage once."""
    steps = str(list(range(5, 101, 5)))
    fleet.write(rollout_block(fleet.prometheus.url, steps=steps, duration="5s"))
    for replica in fleet.replicas:
        replica.start()
    traffic = Traffic(fleet.replicas)
    try:
        for replica in fleet.replicas:
            wait_until(partial(judge_up, replica), timeout=60, what=f"{replica.name} judged")
        fleet.prometheus.stop()
        for replica in fleet.replicas:
            wait_until(partial(judge_failed, replica, 3), timeout=60, what="the outage seen")
        for replica in fleet.replicas:
            step = int(replica.rollout()["step"])
            wait_until(partial(moved_past, replica, step), timeout=60, what="a later step")
    finally:
        traffic.end()
    for replica in fleet.replicas:
        rollout = replica.rollout()
        assert rollout["state"] == "running", rollout
        assert replica.metric("tcpproxy_rollout_prometheus_up") == 0
        log = replica.log.read_text().splitlines()
        # One line per outage: the one still going on, plus any earlier one that ended.
        down = [line for line in log if "does not answer" in line]
        up = [line for line in log if "answers again" in line]
        assert len(down) == len(up) + 1, down + up
        assert "Traceback" not in replica.log.read_text()
    assert sum(traffic.greetings["a"].values()) > 0
