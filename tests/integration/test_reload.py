"""Hot reload and draining over real files and sockets (DESIGN §2)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tcpproxy.proxy import ReloadResult
from tcpproxy.reaper import DRAIN_CLOSE_WINDOW_S
from tests.harness import (
    WAIT_S,
    Backends,
    Client,
    LoopThread,
    RunningProxy,
    ScriptedBackend,
    clients,
    config_yaml,
    free_port,
    greetings,
    listener_yaml,
    pattern,
    sleep_until,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("each_engine")


Start = Callable[[str], RunningProxy]


def two_backends(port: int, v1: str, v2: str, w1: int, w2: int, **options: object) -> str:
    return config_yaml(listener_yaml("app", port, {"v1": (v1, w1), "v2": (v2, w2)}, **options))


def last_reload(running: RunningProxy) -> tuple[str, str | None] | None:
    """The last counted reload's result and the sha256 of the bytes it read."""
    last = running.state(lambda p: p.last_reload)
    return None if last is None else (last.result, last.sha256)


def weights(running: RunningProxy) -> dict[str, int]:
    return running.state(lambda p: {b.name: b.weight for b in p.listeners["app"].backends.values()})


# -- triggers: what the kubelet and editors do to files --


def kubelet_swap(directory: Path, text: str, generation: int) -> None:
    """Update a mounted ConfigMap the way the kubelet does: write a new timestamped directory,
    point `..data_tmp` at it, rename that over `..data`, remove the old directory."""
    new_dir = directory / f"..2026_11_25_12_00_{generation:02d}.000000000"
    new_dir.mkdir()
    (new_dir / "tcpproxy.yaml").write_text(text)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    tmp = directory / "..data_tmp"
    os.symlink(new_dir.name, tmp)
    os.replace(tmp, directory / "..data")
    if not (directory / "tcpproxy.yaml").is_symlink():
        os.symlink("..data/tcpproxy.yaml", directory / "tcpproxy.yaml")
    if old is not None:
        for f in (directory / old).iterdir():
            f.unlink()
        (directory / old).rmdir()


def test_configmap_symlink_swaps_are_each_applied(
    backends: Backends, loop_thread: LoopThread, tmp_path: Path
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    directory = tmp_path / "configmap"
    directory.mkdir()
    kubelet_swap(directory, two_backends(port, v1, v2, 1, 0), 0)
    running = RunningProxy(loop_thread, directory / "tcpproxy.yaml")
    running.watch()
    try:
        for generation, (w1, w2) in enumerate([(0, 1), (3, 1), (1, 5)], start=1):
            kubelet_swap(directory, two_backends(port, v1, v2, w1, w2), generation)
            wait_until(
                partial(lambda want: weights(running) == want, {"v1": w1, "v2": w2}),
                what=f"swap {generation} applied",
            )
        assert running.reload_count("success") == 4  # start-up + 3 swaps
        assert running.reload_count("failure") == 0
        assert greetings(port, 6) == {"v1": 1, "v2": 5}
    finally:
        running.shutdown()


def test_editor_rename_and_in_place_writes_are_applied(
    backends: Backends, start_proxy: Start
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 1, 0))
    running.watch()
    path = running.config_path
    # Rename-on-save: write a sibling file, rename it over the config.
    running.write_config(two_backends(port, v1, v2, 0, 1))
    wait_until(lambda: weights(running) == {"v1": 0, "v2": 1}, what="rename applied")
    # In place: truncate and write the same inode.
    with path.open("r+") as f:
        f.truncate(0)
        f.write(two_backends(port, v1, v2, 2, 2))
    wait_until(lambda: weights(running) == {"v1": 2, "v2": 2}, what="in-place write applied")
    assert running.reload_count("failure") == 0


def test_half_written_file_is_rejected_then_the_complete_one_applied(
    backends: Backends, start_proxy: Start
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 1, 0))
    running.watch()
    full = two_backends(port, v1, v2, 0, 1)
    cut = full.index("weight: 0") + len("weig")  # stop in the middle of a key
    half = hashlib.sha256(full[:cut].encode()).hexdigest()
    with running.config_path.open("w") as f:
        f.write(full[:cut])
        f.flush()
        # The watch may also see the file empty for a moment (truncated, not yet written):
        # wait for the half file's own rejection, not for a count of rejections.
        wait_until(
            lambda: last_reload(running) == ("failure", half),
            what="half file rejected",
        )
        # The old config keeps serving meanwhile.
        assert weights(running) == {"v1": 1, "v2": 0}
        assert greetings(port, 2) == {"v1": 2}
        f.write(full[cut:])
    wait_until(lambda: weights(running) == {"v1": 0, "v2": 1}, what="complete file applied")
    assert greetings(port, 2) == {"v2": 2}


def test_bad_files_never_replace_the_running_config(backends: Backends, start_proxy: Start) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    good = two_backends(port, v1, v2, 1, 0)
    running = start_proxy(good)
    bad_files = [
        "",  # empty
        "listeners: [",  # YAML syntax error
        good.replace("weight: 1", "weight: -1"),  # schema error
        good.replace("weight: 1", "weight: 1\n        colour: blue"),  # unknown key
    ]
    for n, text in enumerate(bad_files, start=1):
        running.write_config(text)
        result = running.reload()
        assert result.result == "failure"
        assert len(result.problems) == 1
        assert result.problems[0].startswith(str(running.config_path))
        assert running.reload_count("failure") == n
        assert greetings(port, 1) == {"v1": 1}
    running.config_path.unlink()  # missing for a moment, as during a swap
    result = running.reload()
    assert result.problems == (f"{running.config_path}: file not found",)
    assert running.metric("tcpproxy_config_last_reload_successful") == 0
    running.write_config(two_backends(port, v1, v2, 0, 1))
    assert running.reload().result == "success"
    assert running.metric("tcpproxy_config_last_reload_successful") == 1
    assert greetings(port, 1) == {"v2": 1}


def test_same_bytes_again_is_not_a_reload(backends: Backends, start_proxy: Start) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    text = two_backends(port, v1, v2, 1, 1)
    running = start_proxy(text)
    # What the watcher's reloads answered, and when each began.
    watched: list[tuple[int, str]] = []
    reload = running.proxy.reload

    async def recording(trigger: str) -> ReloadResult:
        began = time.monotonic_ns()
        result = await reload(trigger)
        if trigger == "watch":
            watched.append((began, result.result))
        return result

    running.state(lambda p: setattr(p, "reload", recording))
    running.watch()
    running.write_config(text)  # same bytes, new inode and mtime
    running.config_path.touch()
    written = time.monotonic_ns()
    assert running.reload("admin").result == "unchanged"
    # The watcher reacts to those writes (however late): every reload it made was a no-op.
    wait_until(lambda: any(began > written for began, _ in watched), what="the watch reloads")
    assert {result for _, result in watched} == {"unchanged"}
    assert running.reload_count("success") == 1  # only the start-up


def test_an_asked_for_reload_of_the_same_bytes_says_so(
    backends: Backends, start_proxy: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """`kill -HUP` or POST /-/reload with the file unchanged: one line says it was heard;
    the watch and the poll, which find the same bytes all the time, stay quiet."""
    v1, v2 = backends.start("v1"), backends.start("v2")
    running = start_proxy(two_backends(free_port(), v1, v2, 1, 1))
    with caplog.at_level(logging.INFO, logger="tcpproxy"):
        for trigger in ("sighup", "admin", "poll", "watch"):
            assert running.reload(trigger).result == "unchanged"
    said = [r for r in caplog.records if getattr(r, "result", None) == "unchanged"]
    assert [getattr(r, "trigger", None) for r in said] == ["sighup", "admin"]
    assert said[0].getMessage().startswith(f"config unchanged from {running.config_path}")


# -- semantics: pinning and draining --


def test_weight_flip_keeps_old_connections_pinned(backends: Backends, start_proxy: Start) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    running = start_proxy(two_backends(port, v1, v2, 100, 0))
    with clients(port, 10) as old:
        assert {c.greeting() for c in old} == {"v1"}
        running.write_config(two_backends(port, v1, v2, 0, 100))
        assert running.reload().result == "success"
        for i, c in enumerate(old):
            line = f"still on v1 #{i}\n".encode()
            assert c.echo(line) == line
        assert greetings(port, 10) == {"v2": 10}
        assert running.backend_stat("app", "v1", "state") == "zero"
        assert len(running.backend_stat("app", "v1", "connections")) == 10


def test_removed_backend_keeps_its_connections_while_it_drains(
    backends: Backends, start_proxy: Start
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    # A deadline no test run reaches: "during the window" holds however slow this machine is.
    running = start_proxy(two_backends(port, v1, v2, 1, 1, drain_timeout="1h"))
    with clients(port, 8) as held:
        names = [c.greeting() for c in held]
        on_v1 = [c for c, name in zip(held, names, strict=True) if name == "v1"]
        on_v2 = [c for c, name in zip(held, names, strict=True) if name == "v2"]
        assert len(on_v1) == len(on_v2) == 4
        running.write_config(
            config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="1h"))
        )
        assert running.reload().result == "success"
        assert running.backend_stat("app", "v1", "state") == "draining"
        assert greetings(port, 4) == {"v2": 4}
        for c in on_v1:
            assert c.echo(b"during drain\n") == b"during drain\n"
        for c in on_v2:
            assert c.echo(b"untouched\n") == b"untouched\n"
        assert len(running.backend_stat("app", "v1", "connections")) == 4
        assert running.backend_stat("app", "v1", "drain_closed") == 0


def test_removed_backend_drains_until_its_deadline(
    backends: Backends, loop_thread: LoopThread, tmp_path: Path
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(two_backends(port, v1, v2, 1, 1, drain_timeout="300ms"))
    # The series outlive the drained-away backend, so that how it ended can be read after.
    running = RunningProxy(loop_thread, path, metrics_linger_s=3600)
    try:
        with clients(port, 8) as held:
            names = [c.greeting() for c in held]
            on_v1 = [c for c, name in zip(held, names, strict=True) if name == "v1"]
            on_v2 = [c for c, name in zip(held, names, strict=True) if name == "v2"]
            running.write_config(
                config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="300ms"))
            )
            assert running.reload().result == "success"
            for c in on_v1:
                assert c.is_closed()
            for c in on_v2:
                assert c.echo(b"untouched\n") == b"untouched\n"
        wait_until(lambda: running.state(lambda p: p.open_connections) == 0, what="all closed")
        # v1's four were closed by its deadline (not by the reload, nor anything else).
        v1_labels = {"listener": "app", "backend": "v1"}
        assert running.metric("tcpproxy_drain_closed_connections_total", **v1_labels) == 4
        closed = "tcpproxy_connections_closed_total"
        assert running.metric(closed, reason="drain_deadline", **v1_labels) == 4
        assert running.metric(closed, reason="client_closed", listener="app", backend="v2") == 4
    finally:
        running.shutdown()


def test_drain_closes_are_counted_and_series_go_after_linger(
    backends: Backends, loop_thread: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The linger is measured on the metrics module's clock: move that clock rather than race
    # a short linger (the series must still be there when read, however slow the reading).
    skew = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0])
    monkeypatch.setattr("tcpproxy.metrics.time", clock)
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(two_backends(port, v1, v2, 1, 0, drain_timeout="200ms"))
    running = RunningProxy(loop_thread, path, metrics_linger_s=600)
    try:
        with clients(port, 3) as held:
            assert {c.greeting() for c in held} == {"v1"}
            running.write_config(
                config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="200ms"))
            )
            running.reload()
            assert all(c.is_closed() for c in held)
        labels = {"listener": "app", "backend": "v1"}
        wait_until(
            lambda: running.metric("tcpproxy_drain_closed_connections_total", **labels) == 3,
            what="drain closes counted",
        )
        wait_until(lambda: running.state(lambda p: p.open_connections) == 0, what="all closed")
        # Drained away: still reported (the linger), but no longer draining.
        wait_until(
            lambda: running.metric("tcpproxy_backend_draining", **labels) == 0,
            what="draining 0 once drained away",
        )
        assert running.metric("tcpproxy_connections_total", **labels) == 3
        skew[0] = 601.0
        wait_until(
            lambda: running.metric("tcpproxy_connections_total", **labels) is None,
            what="series dropped after the linger",
        )
        assert running.metric("tcpproxy_connections_total", listener="app", backend="v2") == 0
    finally:
        running.shutdown()


def test_backend_put_back_before_deadline_is_active_again(
    backends: Backends, start_proxy: Start
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    both = two_backends(port, v1, v2, 1, 0, drain_timeout="1s")
    only_v2 = config_yaml(listener_yaml("app", port, {"v2": (v2, 1)}, drain_timeout="1s"))
    running = start_proxy(both)

    async def remove_and_put_back() -> tuple[str, float | None, str]:
        # On the proxy's loop, one right after the other: the 1 s deadline cannot pass in
        # between because a test thread was slow to be scheduled.
        running.write_config(only_v2)
        assert (await running.proxy.reload("test")).result == "success"
        backend = next(b for b in running.proxy.all_backends() if b.name == "v1")
        state, deadline = backend.state, backend.drain_deadline
        running.write_config(both)
        return state, deadline, (await running.proxy.reload("test")).result

    with clients(port, 2) as held:
        assert {c.greeting() for c in held} == {"v1"}
        state, deadline, put_back = running.thread.run(remove_and_put_back())
        assert (state, put_back) == ("draining", "success")
        assert deadline is not None
        assert running.backend_stat("app", "v1", "state") == "active"
        assert running.backend_stat("app", "v1", "drain_deadline") is None
        # Listed where the file has it (first), not after the backends that stayed.
        assert running.state(lambda p: [b.name for b in p.all_backends()]) == ["v1", "v2"]
        # Past the old deadline, on the proxy's own clock: its timers in order, so anything
        # the old deadline would have done is done by then. The connections are still served.
        running.thread.run(sleep_until(deadline + DRAIN_CLOSE_WINDOW_S))
        for c in held:
            assert c.echo(b"kept\n") == b"kept\n"
        assert running.backend_stat("app", "v1", "drain_closed") == 0
        assert greetings(port, 1) == {"v1": 1}


def test_listener_added_removed_and_moved(backends: Backends, start_proxy: Start) -> None:
    v1 = backends.start("v1")
    a, b, b2 = free_port(), free_port(), free_port()
    first = listener_yaml("a", a, {"v1": (v1, 1)}, drain_timeout="30s")
    running = start_proxy(config_yaml(first))
    held = Client(a)
    assert held.greeting() == "v1"
    # Add listener b.
    running.write_config(config_yaml(first, listener_yaml("b", b, {"v1": (v1, 1)})))
    assert running.reload().result == "success"
    assert greetings(b, 1) == {"v1": 1}
    # Move b to another port: the old port stops accepting.
    running.write_config(config_yaml(first, listener_yaml("b", b2, {"v1": (v1, 1)})))
    assert running.reload().result == "success"
    assert greetings(b2, 1) == {"v1": 1}
    try:
        socket.create_connection(("127.0.0.1", b), timeout=2).close()
        raise AssertionError("old bind still accepts")
    except ConnectionRefusedError:
        pass
    # Remove listener a: it stops accepting, its connection drains and keeps working.
    running.write_config(config_yaml(listener_yaml("b", b2, {"v1": (v1, 1)})))
    assert running.reload().result == "success"
    assert held.echo(b"draining listener\n") == b"draining listener\n"
    try:
        socket.create_connection(("127.0.0.1", a), timeout=2).close()
        raise AssertionError("removed listener still accepts")
    except ConnectionRefusedError:
        pass
    assert running.state(lambda p: "a" in p.retired)
    held.close()
    wait_until(lambda: running.state(lambda p: "a" not in p.retired), what="listener gone")


def test_bind_failure_on_reload_keeps_old_config(backends: Backends, start_proxy: Start) -> None:
    v1 = backends.start("v1")
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    first = listener_yaml("a", port, {"v1": (v1, 1)})
    running = start_proxy(config_yaml(first))
    running.write_config(config_yaml(first, listener_yaml("b", taken, {"v1": (v1, 1)})))
    result = running.reload()
    blocker.close()
    assert result.result == "failure"
    assert result.problems[0].endswith(
        f"listeners[1].bind: cannot listen on 127.0.0.1:{taken}: Address already in use"
    )
    assert running.state(lambda p: sorted(p.listeners)) == ["a"]
    assert greetings(port, 1) == {"v1": 1}


def test_reload_storm_loses_and_alters_nothing(backends: Backends, start_proxy: Start) -> None:
    """200 reloads while 50 connections stream checksummed data both ways.

    Every stream runs until the storm is over and the test says stop, however long the
    reloads take: a stream that ended early would prove nothing about the reloads after it."""
    log: list[tuple[str, int]] = []
    s1 = backends.start("s1", lambda: ScriptedBackend(log))
    s2 = backends.start("s2", lambda: ScriptedBackend(log))
    port = free_port()

    def cfg(w1: int, w2: int) -> str:
        return config_yaml(listener_yaml("app", port, {"s1": (s1, w1), "s2": (s2, w2)}))

    running = start_proxy(cfg(1, 1))
    stop = threading.Event()
    errors: list[str] = []
    sinks: dict[int, bool] = {}  # upstream: the backend's count and digest match ours
    floods: dict[int, int] = {}  # downstream: bytes received, each one checked

    def stream(i: int) -> None:
        # Even connections stream up and get a checksum back; odd ones receive a stream from
        # the backend and check every byte. Both go on until `stop`, at a modest pace (16 KB
        # per 10 ms): flat out, 50 streams saturate a small machine and every reload then
        # waits behind them (minutes for the storm on one loaded core).
        c = Client(port)
        try:
            if i % 2 == 0:
                c.sock.sendall(b"sink\n")
                sent = hashlib.sha256()
                n = 0
                while not stop.is_set():
                    chunk = pattern(16_384, n + i)
                    c.sock.sendall(chunk)
                    sent.update(chunk)
                    n += len(chunk)
                    time.sleep(0.01)
                c.sock.shutdown(socket.SHUT_WR)
                sinks[i] = c.read_all().decode().split() == [str(n), sent.hexdigest()]
            else:
                c.sock.sendall(b"flood %d\n" % i)
                n = 0
                while not stop.is_set():
                    chunk = c.sock.recv(16_384)
                    if not chunk:
                        raise EOFError(f"the stream ended after {n} bytes, before stop")
                    if chunk != pattern(len(chunk), n):
                        raise AssertionError(f"bytes altered or lost at offset {n}")
                    n += len(chunk)
                    time.sleep(0.01)
                c.sock.shutdown(socket.SHUT_WR)  # stop: the backend ends after what it sent
                while chunk := c.sock.recv(1 << 20):
                    if chunk != pattern(len(chunk), n):
                        raise AssertionError(f"bytes altered or lost at offset {n}")
                    n += len(chunk)
                floods[i] = n
        except Exception as exc:  # collected and reported below
            errors.append(f"{i}: {exc!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    wait_until(lambda: running.state(lambda p: p.open_connections) == 50, what="50 streams")
    reloads = 0
    for k in range(1, 201):
        running.write_config(cfg(1 + k % 7, 1 + (k * 3) % 5))
        reloads += running.reload().result == "success"
    during = running.state(lambda p: p.open_connections)
    stop.set()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()], "streams still running 60 s after stop"
    assert reloads == 200
    assert not errors, errors
    assert during == 50  # every stream was still open through all 200 reloads
    assert sinks == dict.fromkeys(range(0, 50, 2), True)
    # Each downstream stream got exactly what its backend sent: no byte lost at the end.
    sent = {int(e.split()[1]): n for e, n in log if e.startswith("flood-sent ")}
    assert floods == sent
    assert sorted(floods) == list(range(1, 50, 2))
    assert all(n > 0 for n in floods.values())
    # No connection was closed by the proxy: all 50 ended by their own peers' FINs.
    assert running.state(lambda p: sum(b.drain_closed for b in p.all_backends())) == 0
    assert (
        running.backend_stat("app", "s1", "total") + running.backend_stat("app", "s2", "total")
        == 50
    )


def test_putting_back_the_running_config_ends_the_failure(
    backends: Backends, start_proxy: Start
) -> None:
    v1, v2 = backends.start("v1"), backends.start("v2")
    port = free_port()
    good = two_backends(port, v1, v2, 1, 0)
    running = start_proxy(good)
    running.write_config("listeners: [")
    assert running.reload().result == "failure"
    assert running.metric("tcpproxy_config_last_reload_successful") == 0
    running.write_config(good)  # the same bytes as the running config
    assert running.reload().result == "success"
    assert running.metric("tcpproxy_config_last_reload_successful") == 1
    assert running.state(lambda p: p.last_failure) is None


def test_idle_timeout_holds_while_weights_change_often(
    start_proxy: Callable[[str], RunningProxy], backends: Backends
) -> None:
    address = backends.start("b")
    port = free_port()

    def config(weight: int) -> str:
        return config_yaml(listener_yaml("l", port, {"b": (address, weight)}, idle_timeout="400ms"))

    proxy = start_proxy(config(1))  # regression: reloads used to restart (starve) the sweep
    client = Client(port)
    assert client.greeting() == "b"
    # A weight shift every 50 ms (a canary script stepping weights) for as long as it takes:
    # the idle connection must be closed meanwhile. Starved, it would stay open throughout.
    deadline = time.monotonic() + WAIT_S
    weight = 2
    while not client.is_closed(timeout=0.05):
        assert time.monotonic() < deadline, f"idle for {WAIT_S}s of reloads, still open"
        proxy.write_config(config(weight))
        assert proxy.reload().result == "success"
        weight += 1
    client.close()
    assert weight > 2  # it was closed while the weights changed


def test_stale_drain_steps_do_not_close_before_the_new_deadline(
    start_proxy: Callable[[str], RunningProxy], backends: Backends
) -> None:
    a, b = backends.start("a"), backends.start("b")
    port = free_port()

    def config(with_a: bool, drain: str) -> str:
        members = {"a": (a, 1), "b": (b, 1)} if with_a else {"b": (b, 1)}
        return config_yaml(listener_yaml("l", port, members, drain_timeout=drain))

    # Regression: steps of an old drain deadline used to close connections of a backend that
    # was put back and removed again within the close window.
    proxy = start_proxy(config(True, "200ms"))

    async def put_back_after_the_first_step() -> tuple[float | None, int]:
        # On the proxy's loop, as soon as the first step has closed some: the other steps of
        # the old window (100 ms apart) are still to come, however slow this machine is.
        backend = next(x for x in proxy.proxy.all_backends() if x.name == "a")
        deadline = backend.drain_deadline
        # Polled on the loop itself (no hook in the proxy to await), one iteration at a time.
        while backend.drain_closed == 0:  # noqa: ASYNC110
            await asyncio.sleep(0)
        proxy.write_config(config(True, "200ms"))  # a is back: deadline lifted
        assert (await proxy.proxy.reload("test")).result == "success"
        return deadline, backend.drain_closed

    with clients(port, 40) as conns:
        on_a = [c for c in conns if c.greeting() == "a"]
        assert len(on_a) == 20
        proxy.write_config(config(False, "200ms"))  # remove a: deadline in 0.2 s
        assert proxy.reload().result == "success"
        deadline, closed_before = proxy.thread.run(put_back_after_the_first_step())
        assert deadline is not None
        assert 0 < closed_before < len(on_a)
        proxy.write_config(config(False, "60s"))  # removed again: a new deadline, 60 s away
        assert proxy.reload().result == "success"
        # Past the old close window on the proxy's own clock (its timers run in order): every
        # stale step has run by then.
        proxy.thread.run(sleep_until(deadline + DRAIN_CLOSE_WINDOW_S + 0.1))
        closed = sum(c.is_closed(timeout=0.01) for c in on_a)
        assert closed == closed_before, f"{closed} of 20 closed though the deadline is 60 s away"
        assert proxy.backend_stat("l", "a", "drain_closed") == closed_before
