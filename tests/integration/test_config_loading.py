"""Loading the config never stops or exhausts the proxy, and a half-written file is never
applied: hostile files over real files and sockets, the parser process, and settling of
files written in place."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from tcpproxy.admin import status
from tcpproxy.config import DEFAULT_MAX_CONFIG_BYTES, parse_config
from tcpproxy.proxy import Proxy, ReloadResult
from tcpproxy.reloader import Reloader
from tests.harness import (
    WAIT_S,
    Backends,
    Client,
    LoopThread,
    RunningProxy,
    config_yaml,
    free_port,
    greetings,
    listener_yaml,
    wait_until,
)
from tests.unit.test_config_limits import EVERY_FIELD, alias_bomb

Start = Callable[[str], RunningProxy]
REPO = Path(__file__).resolve().parents[2]


def routes(port: int, backends: dict[str, tuple[str, int]], **options: object) -> str:
    return config_yaml(listener_yaml("app", port, backends, **options))


def weights(running: RunningProxy) -> dict[str, int]:
    return running.state(lambda p: {b.name: b.weight for b in p.listeners["app"].backends.values()})


def reload_in_background(running: RunningProxy, trigger: str = "admin") -> Future[ReloadResult]:
    return asyncio.run_coroutine_threadsafe(running.proxy.reload(trigger), running.thread.loop)


def replace(path: Path, data: bytes) -> None:
    """Write a sibling and rename it over `path`, as editors and tools do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def stopped_parser() -> Iterator[Callable[[RunningProxy], int]]:
    """SIGSTOP a proxy's parser process: a parse it is given then lasts until the test is
    done with it, however fast the machine. Its pid; SIGCONT at the end if still there."""
    stopped: list[int] = []

    def stop(running: RunningProxy) -> int:
        pid = running.thread.run(running.proxy.parser.start())
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        return pid

    yield stop
    for pid in stopped:
        if not process_gone(pid):
            os.kill(pid, signal.SIGCONT)


# -- the data plane and signals while a file is parsed --------------------------------------


def test_relayed_connection_keeps_echoing_while_an_alias_bomb_is_parsed(
    backends: Backends, start_proxy: Start, stopped_parser: Callable[[RunningProxy], int]
) -> None:
    port = free_port()
    running = start_proxy(routes(port, {"v1": (backends.start("v1"), 1)}))
    client = Client(port)
    assert client.greeting() == "v1"
    running.state(lambda p: setattr(p.parser, "timeout_s", 3600.0))
    pid = stopped_parser(running)
    replace(running.config_path, alias_bomb(400))

    pending = reload_in_background(running)
    for i in range(50):
        line = b"ping %d\n" % i
        assert client.echo(line) == line
        assert greetings(port, 1) == {"v1": 1}  # new connections too
        assert not pending.done(), pending.result()
    os.kill(pid, signal.SIGCONT)
    result = pending.result(WAIT_S)

    assert result.result == "failure"
    assert result.problems == (
        f"{running.config_path}: too large: more than 200,000 nodes once YAML aliases are expanded",
    )
    assert client.echo(b"after\n") == b"after\n"
    client.close()


def test_a_parse_that_outlives_its_time_limit_is_stopped(
    backends: Backends, start_proxy: Start, stopped_parser: Callable[[RunningProxy], int]
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    running.state(lambda p: setattr(p.parser, "timeout_s", 0.2))
    pid = stopped_parser(running)
    running.write_config(routes(port, {"v1": (v1, 2)}))

    result = running.reload()

    assert result.problems == (
        f"{running.config_path}: parsing took longer than 0.2s and was stopped "
        "(the file is too complex)",
    )
    wait_until(lambda: process_gone(pid), what="the stopped parser killed and reaped")
    running.state(lambda p: setattr(p.parser, "timeout_s", 10.0))
    running.config_path.touch()
    assert running.reload().result == "success"  # the same file, parsed by a new process
    assert weights(running) == {"v1": 2}
    assert running.state(lambda p: p.parser.started) == 2


def test_a_parse_that_needs_too_much_memory_is_one_line(
    backends: Backends, start_proxy: Start
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))

    def squeeze(proxy: Proxy) -> None:
        proxy.parser.memory_bytes = 4 << 20
        proxy.parser.stop()  # the next parse starts a process with this limit

    running.state(squeeze)
    many = {f"b{i}": (v1, 1) for i in range(5000)}  # ~250 KiB, ~20 MiB to parse
    running.write_config(routes(port, many))

    result = running.reload()

    assert result.result == "failure"
    (line,) = result.problems
    assert line.startswith(f"{running.config_path}: "), line
    assert "memory" in line or "ended while parsing" in line, line
    assert weights(running) == {"v1": 1}
    assert greetings(port, 1) == {"v1": 1}


def test_a_parser_that_dies_mid_parse_is_one_line_and_replaced(
    backends: Backends, start_proxy: Start, stopped_parser: Callable[[RunningProxy], int]
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    running.state(lambda p: setattr(p.parser, "timeout_s", 3600.0))
    pid = stopped_parser(running)
    running.write_config(routes(port, {"v1": (v1, 5)}))
    pending = reload_in_background(running)
    wait_until(lambda: running.state(lambda p: p.parser.busy), what="the parse under way")
    os.kill(pid, signal.SIGKILL)

    result = pending.result(WAIT_S)

    assert result.problems == (
        f"{running.config_path}: the config parser process ended while parsing "
        "(killed by signal 9)",
    )
    assert running.reload().result == "success"
    assert weights(running) == {"v1": 5}


def test_shutdown_during_a_parse_is_not_held_up_by_it(
    backends: Backends,
    loop_thread: LoopThread,
    tmp_path: Path,
    stopped_parser: Callable[[RunningProxy], int],
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(routes(port, {"v1": (v1, 1)}))
    running = RunningProxy(loop_thread, path)
    running.state(lambda p: setattr(p.parser, "timeout_s", 3600.0))
    pid = stopped_parser(running)
    running.write_config(routes(port, {"v1": (v1, 2)}))
    pending = reload_in_background(running)

    running.shutdown()

    result = pending.result(WAIT_S)
    assert (result.result, result.summary) == ("unchanged", "shutting down")
    assert process_gone(pid)
    assert not running.reload_count("failure")


def test_the_parser_process_stops_when_idle_and_starts_again(
    backends: Backends, start_proxy: Start
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    pid = running.state(lambda p: p.parser.pid)
    assert pid is not None  # it parsed the file at start-up
    running.state(lambda p: setattr(p.parser, "idle_s", 0.0))
    running.write_config(routes(port, {"v1": (v1, 2)}))
    assert running.reload().result == "success"

    wait_until(lambda: running.state(lambda p: p.parser.pid) is None, what="idle parser stopped")
    wait_until(lambda: process_gone(pid), what="idle parser reaped")
    running.write_config(routes(port, {"v1": (v1, 3)}))
    assert running.reload().result == "success"
    assert running.state(lambda p: p.parser.started) == 2
    assert weights(running) == {"v1": 3}


@pytest.mark.parametrize("data", [EVERY_FIELD, (REPO / "config" / "tcpproxy.yaml").read_bytes()])
def test_the_parser_process_gives_what_an_in_process_parse_gives(
    start_proxy: Start, data: bytes
) -> None:
    running = start_proxy(routes(free_port(), {"v1": ("127.0.0.1:1", 1)}))

    parsed = running.thread.run(running.proxy.parser.parse(data, "x.yaml"))

    assert parsed == parse_config(data, "x.yaml")


# -- hostile files: rejected like any bad file, the old config serving ----------------------


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "alias bomb": (
        lambda path: replace(path, alias_bomb(400)),
        "too large: more than 200,000 nodes once YAML aliases are expanded",
    ),
    "over the size limit": (
        lambda path: replace(path, b"#" * (DEFAULT_MAX_CONFIG_BYTES + 1)),
        "file is larger than 1 MiB, the limit (--max-config-size, TCPPROXY_MAX_CONFIG_SIZE)",
    ),
    "symlink to /dev/zero": (dev_zero, "is a character device, expected a regular file"),
    "FIFO": (fifo, "is a named pipe (FIFO), expected a regular file"),
    "directory": (directory, "is a directory, expected a YAML file"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_is_rejected_in_one_line_recorded_and_the_old_config_serves(
    backends: Backends, start_proxy: Start, case: str
) -> None:
    make, reason = HOSTILE[case]
    port = free_port()
    v1, v2 = backends.start("v1"), backends.start("v2")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    held = Client(port)
    assert held.greeting() == "v1"
    make(running.config_path)

    result = running.reload()

    expected = f"{running.config_path}: {reason}"
    assert (result.result, result.problems) == ("failure", (expected,))
    shown = running.state(status)
    assert shown["last_error"] == [expected]
    assert shown["last_reload"]["result"] == "failure"
    assert running.reload_count("failure") == 1
    assert running.metric("tcpproxy_config_last_reload_successful") == 0
    assert held.echo(b"still here\n") == b"still here\n"
    assert greetings(port, 2) == {"v1": 2}
    # The next good file is applied.
    if running.config_path.is_dir():
        running.config_path.rmdir()
    else:
        running.config_path.unlink()
    running.write_config(routes(port, {"v2": (v2, 1)}))
    assert running.reload().result == "success"
    assert greetings(port, 1) == {"v2": 1}
    held.close()


def test_hostile_file_seen_by_the_watch_and_polls_is_reported_once(
    backends: Backends, start_proxy: Start
) -> None:
    port = free_port()
    running = start_proxy(routes(port, {"v1": (backends.start("v1"), 1)}))
    polls: list[str] = []
    reload = running.proxy.reload

    async def counting(trigger: str, *args: object) -> ReloadResult:
        result = await reload(trigger, *args)  # type: ignore[arg-type]
        if trigger == "poll":
            polls.append(result.result)
        return result

    running.state(lambda p: setattr(p, "reload", counting))
    running.watch(poll_interval_s=0.02)  # the watch and the poll both see it, again and again
    fifo(running.config_path)

    wait_until(lambda: running.reload_count("failure") == 1, what="the FIFO rejected")
    seen = len(polls)
    wait_until(lambda: len(polls) >= seen + 5, what="five more polls of the FIFO")
    assert running.reload_count("failure") == 1
    assert greetings(port, 1) == {"v1": 1}


# -- a file written in place is applied once it has settled ---------------------------------


@pytest.fixture
def settle_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="tcpproxy")
    return caplog


def settle_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "written in place" in r.getMessage()]


def watch_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the watch did: began to settle a file, or reloaded it."""
    return [
        r
        for r in caplog.records
        if "written in place" in r.getMessage() or getattr(r, "trigger", None) == "watch"
    ]


def test_in_place_write_that_pauses_mid_file_is_not_applied_until_complete_and_settled(
    backends: Backends, start_proxy: Start, settle_log: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    v1, v2 = backends.start("v1"), backends.start("v2")
    # drain_timeout 0: were the half file applied, v2's connection would be closed at once.
    before = routes(port, {"v1": (v1, 1), "v2": (v2, 1)}, drain_timeout=0)
    after = routes(port, {"v1": (v1, 3), "v2": (v2, 1)}, drain_timeout=0)
    running = start_proxy(before)
    on_v1, on_v2 = Client(port), Client(port)
    assert (on_v1.greeting(), on_v2.greeting()) == ("v1", "v2")
    running.watch()
    reloader = running.reloader
    assert reloader is not None
    running.state(lambda p: setattr(reloader, "settle_s", 3600.0))  # cannot settle meanwhile
    cut = after.index("      - name: v2")
    assert parse_config(after[:cut].encode(), "half").config  # a valid config on its own
    with running.config_path.open("w") as f:  # in place: truncate, write the first half
        f.write(after[:cut])
        f.flush()
        wait_until(lambda: bool(watch_records(settle_log)), what="the watch to react")

        assert settle_records(settle_log), [r.getMessage() for r in watch_records(settle_log)]
        assert running.reload_count("success") == 1  # the start-up only
        assert weights(running) == {"v1": 1, "v2": 1}
        assert on_v2.echo(b"v2 still up\n") == b"v2 still up\n"
        assert running.state(lambda p: reloader.settles) == 1

        running.state(lambda p: setattr(reloader, "settle_s", 0.05))
        f.write(after[cut:])  # the rest: the write is complete now
    wait_until(lambda: weights(running) == {"v1": 3, "v2": 1}, what="the complete file applied")

    assert running.reload_count("success") == 2
    assert not running.reload_count("failure")
    assert running.state(lambda p: p.last_reload.trigger if p.last_reload else None) == "watch"
    assert on_v2.echo(b"never drained\n") == b"never drained\n"
    on_v1.close()
    on_v2.close()


def test_rename_is_applied_at_once_without_settling(
    backends: Backends, start_proxy: Start, settle_log: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    running.watch()
    reloader = running.reloader
    assert reloader is not None
    running.state(lambda p: setattr(reloader, "settle_s", 3600.0))  # settling would never end

    running.write_config(routes(port, {"v1": (v1, 7)}))

    wait_until(lambda: weights(running) == {"v1": 7}, what="the renamed file applied")
    assert running.state(lambda p: reloader.settles) == 0
    assert settle_records(settle_log) == []


def configmap_swap(directory: Path, text: str, generation: int) -> None:
    """The kubelet's update: a new timestamped directory, `..data` renamed to point at it."""
    new = directory / f"..2026_12_01_00_00_{generation:02d}.000000000"
    new.mkdir()
    (new / "tcpproxy.yaml").write_text(text)
    (directory / "..data_tmp").symlink_to(new.name)
    (directory / "..data_tmp").replace(directory / "..data")
    if not (directory / "tcpproxy.yaml").is_symlink():
        (directory / "tcpproxy.yaml").symlink_to("..data/tcpproxy.yaml")


def test_configmap_swap_is_applied_at_once_without_settling(
    backends: Backends,
    loop_thread: LoopThread,
    tmp_path: Path,
    settle_log: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    configmap_swap(tmp_path, routes(port, {"v1": (v1, 1)}), 0)
    running = RunningProxy(loop_thread, tmp_path / "tcpproxy.yaml")
    try:
        running.watch()
        reloader = running.reloader
        assert reloader is not None
        running.state(lambda p: setattr(reloader, "settle_s", 3600.0))

        configmap_swap(tmp_path, routes(port, {"v1": (v1, 4)}), 1)

        wait_until(lambda: weights(running) == {"v1": 4}, what="the swap applied")
        assert running.state(lambda p: reloader.settles) == 0
        assert settle_records(settle_log) == []
    finally:
        running.shutdown()


def test_poll_settles_in_place_writes_and_applies_renames_at_once(
    backends: Backends, start_proxy: Start
) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    # Polling only: it cannot tell how the file changed but by the file itself.
    reloader = running.thread.call(Reloader, running.proxy, 0.02, False, 3600.0)
    running.reloader = reloader
    running.thread.call(reloader.start)

    running.config_path.write_text(routes(port, {"v1": (v1, 2)}))  # in place

    wait_until(lambda: running.state(lambda p: reloader.settles) == 1, what="settling")
    assert weights(running) == {"v1": 1}
    running.state(lambda p: setattr(reloader, "settle_s", 0.0))
    wait_until(lambda: weights(running) == {"v1": 2}, what="settled and applied")

    running.write_config(routes(port, {"v1": (v1, 3)}))  # a rename
    running.state(lambda p: setattr(reloader, "settle_s", 3600.0))
    wait_until(lambda: weights(running) == {"v1": 3}, what="the rename applied")
    assert running.state(lambda p: reloader.settles) == 1


def test_a_rename_during_settling_wins_and_the_half_file_is_never_applied(
    backends: Backends, start_proxy: Start
) -> None:
    port = free_port()
    v1, v2 = backends.start("v1"), backends.start("v2")
    running = start_proxy(routes(port, {"v1": (v1, 1), "v2": (v2, 1)}))
    running.watch()
    reloader = running.reloader
    assert reloader is not None
    running.state(lambda p: setattr(reloader, "settle_s", 3600.0))
    with running.config_path.open("w") as f:
        f.write(routes(port, {"v1": (v1, 9)}))  # a valid file, but the writer is not done
        f.flush()
        wait_until(lambda: running.state(lambda p: reloader.settles) == 1, what="settling")

        running.write_config(routes(port, {"v1": (v1, 2), "v2": (v2, 2)}))

        wait_until(lambda: weights(running) == {"v1": 2, "v2": 2}, what="the rename applied")
    running.state(lambda p: setattr(reloader, "settle_s", 0.0))
    assert running.reload("admin").result == "unchanged"  # nothing left settling
    assert running.reload_count("success") == 2
    assert weights(running) == {"v1": 2, "v2": 2}


def test_sighup_applies_an_in_place_write_at_once(backends: Backends, start_proxy: Start) -> None:
    port = free_port()
    v1 = backends.start("v1")
    running = start_proxy(routes(port, {"v1": (v1, 1)}))
    running.watch()
    reloader = running.reloader
    assert reloader is not None
    running.state(lambda p: setattr(reloader, "settle_s", 3600.0))
    running.config_path.write_text(routes(port, {"v1": (v1, 6)}))  # in place

    running.thread.call(reloader.trigger, "sighup")  # what the SIGHUP handler calls

    wait_until(lambda: weights(running) == {"v1": 6}, what="SIGHUP applied it")
    assert running.state(lambda p: p.last_reload.trigger if p.last_reload else None) == "sighup"
