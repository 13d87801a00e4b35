"""The limits checked at start (pure parts): the cgroup memory limit read from a fake cgroup
tree, the open files arithmetic, their one-line warnings, and the listener keys that bound
what one client or one stalled connection can hold."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy import limits
from tcpproxy.config import ConfigError, ListenerConfig, parse_config
from tcpproxy.limits import (
    FD_HEADROOM,
    FD_LIMIT_CAP,
    WORST_CASE_BYTES_PER_CONNECTION,
    MemoryLimit,
    cgroup_paths,
    fds_needed,
    memory_limit,
    memory_warning,
    open_files_warning,
    parse_limit_value,
    raised_soft_limit,
)

INFINITY = resource.RLIM_INFINITY
V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 writes for "no limit" (4 KiB pages)


def listener_config(name: str = "w", **options: object) -> ListenerConfig:
    return ListenerConfig.model_validate(
        {
            "name": name,
            "bind": "127.0.0.1:8008",
            "backends": [{"name": "v1", "address": "10.0.0.1:9000"}],
            **options,
        }
    )


def cgroup_tree(root: Path, path: str, files: dict[str, str]) -> None:
    """Write `files` ({relative directory: content} of memory.max or the v1 file) under a
    fake /sys/fs/cgroup at `root`, and a /proc/self/cgroup naming `path`."""
    for relative, content in files.items():
        directory = root / relative
        directory.mkdir(parents=True, exist_ok=True)
        name = "memory.limit_in_bytes" if relative.startswith("memory") else "memory.max"
        (directory / name).write_text(content)
    (root / "proc_self_cgroup").write_text(path)


# -- cgroup files --


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("268435456\n", 268435456),
        ("max\n", None),
        ("max", None),
        (V1_NO_LIMIT + "\n", None),
        ("", None),
        ("-1", None),
        ("12 MiB", None),
    ],
)
def test_limit_values(text: str, expected: int | None) -> None:
    assert parse_limit_value(text) == expected


@given(st.integers(0, (1 << 62) - 1), st.sampled_from(["", "\n", " \n"]))
def test_every_byte_count_below_no_limit_reads_back(value: int, end: str) -> None:
    assert parse_limit_value(f"{value}{end}") == value


def test_proc_self_cgroup_v2_v1_and_hybrid() -> None:
    assert cgroup_paths("0::/kubepods/pod1/c1\n") == ("/kubepods/pod1/c1", None)
    hybrid = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"
    assert cgroup_paths(hybrid) == ("/docker/abc", "/docker/abc")
    assert cgroup_paths("5:cpuset,memory:/a/b\n1:name=systemd:/a/b\n") == (None, "/a/b")
    assert cgroup_paths("") == (None, None)
    assert cgroup_paths("garbage\n") == (None, None)


def test_v2_limit_of_the_process_cgroup(tmp_path: Path) -> None:
    cgroup_tree(tmp_path, "0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1": "268435456\n"})
    found = memory_limit(tmp_path, tmp_path / "proc_self_cgroup")
    assert found == MemoryLimit(268435456, tmp_path / "kubepods/pod1/c1/memory.max")


def test_v2_a_tighter_limit_above_applies(tmp_path: Path) -> None:
    cgroup_tree(
        tmp_path,
        "0::/kubepods/pod1/c1\n",
        {"kubepods/pod1/c1": "max\n", "kubepods/pod1": "104857600\n", "kubepods": "max\n"},
    )
    found = memory_limit(tmp_path, tmp_path / "proc_self_cgroup")
    assert found == MemoryLimit(104857600, tmp_path / "kubepods/pod1/memory.max")


def test_v2_in_a_container_with_its_own_cgroup_namespace(tmp_path: Path) -> None:
    # The process is at "/", and the mount is its container's cgroup.
    cgroup_tree(tmp_path, "0::/\n", {".": "536870912\n"})
    found = memory_limit(tmp_path, tmp_path / "proc_self_cgroup")
    assert found == MemoryLimit(536870912, tmp_path / "memory.max")


def test_v1_limit_and_its_no_limit(tmp_path: Path) -> None:
    membership = "4:memory:/docker/abc\n0::/docker/abc\n"
    cgroup_tree(tmp_path, membership, {"memory/docker/abc": "1073741824\n", "memory": V1_NO_LIMIT})
    found = memory_limit(tmp_path, tmp_path / "proc_self_cgroup")
    assert found == MemoryLimit(1073741824, tmp_path / "memory/docker/abc/memory.limit_in_bytes")
    (tmp_path / "memory/docker/abc/memory.limit_in_bytes").write_text(V1_NO_LIMIT)
    assert memory_limit(tmp_path, tmp_path / "proc_self_cgroup") is None


def test_v1_in_a_container_that_sees_its_cgroup_at_the_mount(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path, which the container's mount does not have.
    cgroup_tree(tmp_path, "4:memory:/docker/abc\n", {"memory": "209715200\n"})
    found = memory_limit(tmp_path, tmp_path / "proc_self_cgroup")
    assert found == MemoryLimit(209715200, tmp_path / "memory/memory.limit_in_bytes")


def test_no_cgroup_files_no_limit(tmp_path: Path) -> None:
    assert memory_limit(tmp_path, tmp_path / "missing") is None
    cgroup_tree(tmp_path, "0::/a\n", {"a": "max\n"})
    assert memory_limit(tmp_path, tmp_path / "proc_self_cgroup") is None


@given(st.lists(st.one_of(st.none(), st.integers(1, 1 << 40)), min_size=1, max_size=6))
def test_the_tightest_limit_on_the_path_wins(
    tmp_path_factory: pytest.TempPathFactory, levels: list[int | None]
) -> None:
    """levels[0] is the mount (the root), levels[-1] the process's own cgroup."""
    root = tmp_path_factory.mktemp("cgroup")
    parts = [f"g{i}" for i in range(1, len(levels))]
    files = {}
    for depth, limit in enumerate(levels):
        files["/".join(parts[:depth]) or "."] = "max\n" if limit is None else f"{limit}\n"
    cgroup_tree(root, "0::/" + "/".join(parts) + "\n", files)
    found = memory_limit(root, root / "proc_self_cgroup")
    set_limits = [limit for limit in levels if limit is not None]
    if not set_limits:
        assert found is None
    else:
        assert found is not None
        assert found.limit_bytes == min(set_limits)


# -- warnings --


def test_memory_warning_names_the_numbers_the_limit_and_the_setting() -> None:
    limit = MemoryLimit(256 << 20, Path("/sys/fs/cgroup/memory.max"))
    line = memory_warning(limit, [listener_config()])  # 10,000 x 64 KiB = 625 MiB
    assert line is not None
    assert "\n" not in line
    for part in ("max_connections 10000", "625 MiB", "256 MiB", "/sys/fs/cgroup/memory.max"):
        assert part in line, line
    assert f"about {(256 << 20) // WORST_CASE_BYTES_PER_CONNECTION} connections fit" in line


def test_memory_warning_only_past_the_limit() -> None:
    fits = listener_config(max_connections=1000)
    exact = MemoryLimit(1000 * WORST_CASE_BYTES_PER_CONNECTION, Path("memory.max"))
    assert memory_warning(exact, [fits]) is None
    short = MemoryLimit(exact.limit_bytes - 1, Path("memory.max"))
    assert memory_warning(short, [fits]) is not None
    assert memory_warning(None, [fits]) is None


def test_memory_warning_adds_up_the_listeners() -> None:
    a, b = listener_config("a", max_connections=600), listener_config("b", max_connections=600)
    limit = MemoryLimit(1000 * WORST_CASE_BYTES_PER_CONNECTION, Path("memory.max"))
    assert memory_warning(limit, [a]) is None
    line = memory_warning(limit, [a, b])
    assert line is not None
    assert "max_connections 1200 (all listeners: a 600, b 600)" in line


def test_open_files_warning_at_the_threshold() -> None:
    config = [listener_config(max_connections=10_000)]
    needed = fds_needed(10_000)
    assert needed == 2 * 10_000 + FD_HEADROOM
    assert open_files_warning(needed, needed, config) is None
    assert open_files_warning(INFINITY, INFINITY, config) is None
    line = open_files_warning(1024, 4096, config)
    assert line is not None
    assert "\n" not in line
    for part in ("open files limit 1024", "hard limit 4096", "max_connections 10000", "20256"):
        assert part in line, line
    assert f"about {(1024 - FD_HEADROOM) // 2} connections fit" in line
    assert "hard limit unlimited" in (open_files_warning(1024, INFINITY, config) or "")


@given(st.integers(0, 1 << 30), st.one_of(st.integers(0, 1 << 30), st.just(INFINITY)))
def test_the_soft_limit_only_goes_up_to_the_hard_one_and_the_cap(soft: int, hard: int) -> None:
    if hard != INFINITY:
        soft = min(soft, hard)
    target = raised_soft_limit(soft, hard)
    assert target >= soft
    assert target == soft or target == min(FD_LIMIT_CAP, hard if hard != INFINITY else FD_LIMIT_CAP)
    if hard != INFINITY:
        assert target <= hard


def test_check_at_start_logs_one_line_per_short_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    monkeypatch.setattr(limits, "memory_limit", lambda: MemoryLimit(1 << 20, Path("memory.max")))
    limits.check_at_start([listener_config()])
    warnings = [r.getMessage() for r in caplog.records if r.name == "tcpproxy"]
    assert len(warnings) == 2
    assert "open files limit 1024" in warnings[0]
    assert "memory limit of 1 MiB" in warnings[1]


# -- the listener keys --


def problems(**options: object) -> list[str]:
    document = {
        "listeners": [
            {
                "name": "w",
                "bind": "127.0.0.1:8008",
                "backends": [{"name": "v1", "address": "10.0.0.1:9000"}],
                **options,
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(document).encode(), "routes.yaml")
    return info.value.problems


def test_defaults_of_the_new_listener_keys() -> None:
    config = listener_config()
    assert config.max_connections_per_client is None
    assert config.client_connection_limit == 1000  # a tenth of max_connections
    assert config.first_byte_timeout == 30.0
    assert config.half_close_timeout == 60.0
    assert listener_config(max_connections=500).client_connection_limit == 50
    assert listener_config(max_connections=3).client_connection_limit == 1  # rounded up
    assert listener_config(max_connections_per_client=0).client_connection_limit == 0
    assert listener_config(max_connections_per_client=7).client_connection_limit == 7
    assert listener_config(first_byte_timeout="250ms").first_byte_timeout == 0.25
    assert listener_config(half_close_timeout=0).half_close_timeout == 0


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("max_connections_per_client", -1, "greater than or equal to 0"),
        ("max_connections_per_client", "10", "valid integer"),
        ("max_connections_per_client", 1.5, "valid integer"),
        ("first_byte_timeout", "soon", "invalid duration"),
        ("first_byte_timeout", -1, "must be a finite value >= 0"),
        ("half_close_timeout", "1 week", "invalid duration"),
    ],
)
def test_bad_values_are_one_line_naming_file_and_field(
    key: str, value: object, reason: str
) -> None:
    [line] = problems(**{key: value})
    assert line.startswith(f"routes.yaml: listeners[0].{key}: "), line
    assert reason in line, line
    assert "\n" not in line
