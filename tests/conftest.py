from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import Backends, LoopThread, RunningProxy

# Hypothesis times each example (a 200 ms deadline) and its data generation (the too_slow
# health check): both fail on a slow or loaded machine with nothing wrong in the code.
settings.register_profile("tcpproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tcpproxy")


@pytest.fixture(params=["uvloop"])
def loop_thread(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    thread = LoopThread(use_uvloop=request.param == "uvloop")
    yield thread
    thread.stop()


@pytest.fixture
def backends(loop_thread: LoopThread) -> Iterator[Backends]:
    b = Backends(loop_thread)
    yield b
    b.close()


@pytest.fixture
def start_proxy(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Callable[[str], RunningProxy]]:
    """Start a proxy from YAML text; it is shut down (grace 0) after the test."""
    started: list[RunningProxy] = []

    def start(text: str) -> RunningProxy:
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        path = directory / "tcpproxy.yaml"
        path.write_text(text)
        running = RunningProxy(loop_thread, path)
        started.append(running)
        return running

    yield start
    for running in started:
        running.shutdown(0)
