"""Config loading is bounded: the file's size and kind, YAML nodes after alias expansion,
nesting, problems reported. Each hostile file is refused with one line naming it, without
reading, building or walking more than the limits allow."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from tcpproxy.config import (
    DEFAULT_CONFIG_SETTLE_S,
    DEFAULT_MAX_CONFIG_BYTES,
    MAX_CONFIG_NODES,
    MAX_PROBLEMS,
    ConfigError,
    RouteConfig,
    load_config,
    parse_config,
    read_config_bytes,
    read_config_file,
)
from tcpproxy.settings import SettingsError, load_settings
from tests.harness import WAIT_S
from tests.unit.test_config import config_dicts, dump

SOURCE = "routes.yaml"
GOOD = b"""\
listeners:
  - name: app
    bind: "127.0.0.1:8008"
    backends:
      - {name: v1, address: "127.0.0.1:9001", weight: 1}
"""


# Every optional block and kind of value, for the round trip through the parser process.
EVERY_FIELD = b"""\
listeners:
  - name: app
    bind: "[::1]:8008"
    backends:
      - {name: v1, address: "app-v1:9000", weight: 0}
      - {name: v2, address: "10.0.0.2:9000"}
    drain_timeout: 250ms
    connect_timeout: 1.5
    idle_timeout: 0
    max_connections: 7
    engine: splice
    balance: client_hash
    health_check: {interval: 2s, timeout: 0.5, send: "PING\\r\\n", expect: "+PONG"}
    ejection: null
    proxy_protocol: {send: v2, accept: true}
    rollout:
      from: v1
      to: v2
      steps: [5, 50, 100]
      step_duration: 10m
      started_at: 2026-11-25T14:00:00.123456+01:00
      abort: {max_failure_ratio: 0.25, window: 1m, min_attempts: 3, on_unhealthy: false}
  - name: other
    bind: "127.0.0.1:8009"
    backends: [{name: a, address: "127.0.0.1:1"}, {name: b, address: "127.0.0.1:2"}]
    rollout: {from: a, to: b, steps: [100], step_duration: 1h, started_at: 2026-11-25 14:00:00}
"""


def alias_bomb(fan: int) -> bytes:
    """`fan` copies of a listener whose backends are `fan` copies of one bad backend: 3 KiB
    at fan 400 is 160,000 validation errors (1.1 million nodes) once the aliases expand."""
    return (
        "b: &b {name: v1, address: '127.0.0.1:1', weight: -1}\n"
        f"bs: &bs [{', '.join(['*b'] * fan)}]\n"
        "l: &l {name: x, bind: '127.0.0.1:1', backends: *bs}\n"
        f"listeners: [{', '.join(['*l'] * fan)}]\n"
    ).encode()


def billion_laughs(levels: int = 9, fan: int = 9) -> bytes:
    lines = [f"a0: &a0 [{', '.join(['lol'] * fan)}]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]")
    lines.append(f"listeners: *a{levels}")
    return "\n".join(lines).encode()


def merge_bomb(levels: int = 6, fan: int = 10) -> bytes:
    """Merge keys (`<<`) repeat a mapping's pairs: PyYAML flattens them into lists that grow
    by `fan` each level (a million pairs here) before the duplicates collapse."""
    lines = ["m0: &m0 {k0: 1, k1: 2}"]
    for i in range(1, levels + 1):
        lines.append(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * fan)}]}}")
    lines.append(f"listeners: [*m{levels}]")
    return "\n".join(lines).encode()


def one_problem(data: bytes, source: str = SOURCE) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    assert len(info.value.problems) == 1, info.value.problems[:3]
    (line,) = info.value.problems
    assert line.startswith(f"{source}:"), line
    assert "\n" not in line
    assert "Traceback" not in line
    return line


# -- YAML: aliases, merge keys, recursion, nesting ------------------------------------------


def test_alias_bomb_is_refused_in_one_line_before_it_expands() -> None:
    data = alias_bomb(400)
    assert len(data) < 4096

    line = one_problem(data)

    assert line == (
        f"{SOURCE}: too large: more than {MAX_CONFIG_NODES:,} nodes once YAML aliases are expanded"
    )


def test_billion_laughs_is_refused() -> None:
    assert "once YAML aliases are expanded" in one_problem(billion_laughs())


def test_merge_key_bomb_is_refused() -> None:
    assert "once YAML aliases are expanded" in one_problem(merge_bomb())


def test_recursive_alias_is_refused_with_its_position() -> None:
    line = one_problem(b"listeners: &a [x, *a]\n")
    assert line == (
        f"{SOURCE}:1:19: invalid YAML: an alias inside the node it names (a recursive structure)"
    )


def test_aliases_within_the_budget_are_fine() -> None:
    data = b"""\
listeners:
  - name: a
    bind: "127.0.0.1:8001"
    backends: &backends
      - {name: v1, address: "10.0.0.1:9000", weight: 1}
      - {name: v2, address: "10.0.0.2:9000", weight: 3}
    health_check: &checks {interval: 2s, timeout: 1s}
  - name: b
    bind: "127.0.0.1:8002"
    backends: *backends
    health_check: *checks
"""
    a, b = parse_config(data, SOURCE).config.listeners
    assert a.backends == b.backends
    assert b.health_check is not None
    assert b.health_check.interval == 2.0


def test_many_nodes_without_aliases_are_refused() -> None:
    data = b"listeners: [" + b",".join([b"1"] * (MAX_CONFIG_NODES + 1)) + b"]\n"
    assert one_problem(data) == f"{SOURCE}: too large: more than {MAX_CONFIG_NODES:,} YAML nodes"


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        "".join("  " * depth + "- \n" for depth in range(2000)).encode(),
        b"listeners: " + b"{a: " * 5000 + b"1" + b"}" * 5000,
    ],
    ids=["flow", "block", "mapping"],
)
def test_deep_nesting_is_one_line(data: bytes) -> None:
    assert "invalid YAML: " in one_problem(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"listeners: " + b"1" * 5000, "an integer of more than"),
        (b"listeners: 2026-13-45\n", "month must be in 1..12"),
        (b"a: &x 1\nb: &x 2\nlisteners: *x\n", "found duplicate anchor 'x'"),
        (b"listeners: []\n---\nlisteners: []\n", "only one document without apiVersion"),
    ],
)
def test_values_python_cannot_hold_are_one_line(data: bytes, reason: str) -> None:
    assert reason in one_problem(data)


def test_at_most_max_problems_lines_then_a_count() -> None:
    backends = "".join(
        f"      - {{name: b{i}, address: '10.0.0.1:1', weight: -1}}\n" for i in range(200)
    )
    data = f"listeners:\n  - name: a\n    bind: '127.0.0.1:1'\n    backends:\n{backends}"

    with pytest.raises(ConfigError) as info:
        parse_config(data.encode(), SOURCE)

    problems = info.value.problems
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[0] == (
        f"{SOURCE}: listeners[0].backends[0].weight: Input should be greater than or equal to 0"
    )
    assert problems[-1] == f"{SOURCE}: and {200 - MAX_PROBLEMS} more problems"


def test_duplicate_name_problems_are_capped_too() -> None:
    backends = "".join("      - {name: same, address: '10.0.0.1:1'}\n" for _ in range(100))
    data = f"listeners:\n  - name: a\n    bind: '127.0.0.1:1'\n    backends:\n{backends}"

    with pytest.raises(ConfigError) as info:
        parse_config(data.encode(), SOURCE)

    assert len(info.value.problems) == MAX_PROBLEMS + 1
    assert info.value.problems[-1] == f"{SOURCE}: and {99 - MAX_PROBLEMS} more problems"


# -- the file: size, kind, never blocking ----------------------------------------------------


def read_in_thread(path: Path, **kwargs: int) -> ConfigError:
    """read_config_bytes in a thread, so that a read that blocks fails the test rather than
    hanging it; the ConfigError it raised."""
    errors: list[BaseException] = []

    def read() -> None:
        try:
            read_config_bytes(path, **kwargs)
        except BaseException as exc:  # handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive(), f"reading {path} blocked"
    assert errors, f"reading {path} succeeded"
    assert isinstance(errors[0], ConfigError), repr(errors[0])
    return errors[0]


def only_line(error: ConfigError) -> str:
    assert len(error.problems) == 1, error.problems
    return error.problems[0]


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    os.mkfifo(path)  # nobody ever writes: opening it for reading would wait forever

    assert only_line(read_in_thread(path)) == (
        f"{path}: is a named pipe (FIFO), expected a regular file"
    )


def test_symlink_to_dev_zero_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.symlink_to("/dev/zero")

    assert (
        only_line(read_in_thread(path)) == f"{path}: is a character device, expected a regular file"
    )


def test_directory_is_refused(tmp_path: Path) -> None:
    assert (
        only_line(read_in_thread(tmp_path)) == f"{tmp_path}: is a directory, expected a YAML file"
    )


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.write_bytes(b"#" * (DEFAULT_MAX_CONFIG_BYTES + 1))

    assert only_line(read_in_thread(path)) == (
        f"{path}: file is larger than 1 MiB, the limit (--max-config-size, "
        "TCPPROXY_MAX_CONFIG_SIZE)"
    )


def test_size_limit_is_a_parameter_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.write_bytes(GOOD)

    assert read_config_bytes(path, max_bytes=len(GOOD)) == GOOD
    assert only_line(read_in_thread(path, max_bytes=len(GOOD) - 1)) == (
        f"{path}: file is larger than {len(GOOD) - 1} bytes, the limit (--max-config-size, "
        "TCPPROXY_MAX_CONFIG_SIZE)"
    )


def test_configmap_symlinks_to_a_regular_file_are_read(tmp_path: Path) -> None:
    # What the kubelet mounts: tcpproxy.yaml -> ..data/tcpproxy.yaml, ..data -> ..2026_...
    generation = tmp_path / "..2026_11_25_12_00_00.000000000"
    generation.mkdir()
    (generation / "tcpproxy.yaml").write_bytes(GOOD)
    (tmp_path / "..data").symlink_to(generation.name)
    path = tmp_path / "tcpproxy.yaml"
    path.symlink_to("..data/tcpproxy.yaml")

    file = read_config_file(path)

    assert file.data == GOOD
    assert file.inode == (generation / "tcpproxy.yaml").stat().st_ino
    assert load_config(path).config.listeners[0].name == "app"


# -- the settings that set the limits ---------------------------------------------------------


def test_max_config_size_and_settle_defaults() -> None:
    settings = load_settings()
    assert settings.max_config_size == DEFAULT_MAX_CONFIG_BYTES == 1 << 20
    assert settings.config_settle == DEFAULT_CONFIG_SETTLE_S == 1.0


def test_max_config_size_from_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(max_config_size="512KiB").max_config_size == 512 * 1024
    monkeypatch.setenv("TCPPROXY_MAX_CONFIG_SIZE", "2MiB")
    monkeypatch.setenv("TCPPROXY_CONFIG_SETTLE", "250ms")
    settings = load_settings()
    assert settings.max_config_size == 2 << 20
    assert settings.config_settle == 0.25
    assert load_settings(max_config_size="4096").max_config_size == 4096  # the flag wins


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--max-config-size: Input should be greater than or equal to 1"),
        ("lots", "--max-config-size: could not parse value and unit from byte string"),
    ],
)
def test_bad_max_config_size_names_the_flag(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(max_config_size=value)
    assert str(info.value) == message


# -- what the parser process sends back rebuilds the same config ------------------------------


def round_trip(config: RouteConfig) -> RouteConfig:
    """What the proxy makes of the parser process's answer (config_worker)."""
    return RouteConfig.model_validate_json(config.model_dump_json(by_alias=True))


def offsets(config: RouteConfig) -> list[object]:
    """Each rollout's started_at offset from UTC (None: no started_at)."""
    return [
        lst.rollout.started_at.utcoffset() if lst.rollout and lst.rollout.started_at else None
        for lst in config.listeners
    ]


def test_every_field_survives_the_round_trip() -> None:
    config = parse_config(EVERY_FIELD, SOURCE).config

    again = round_trip(config)

    assert again == config
    # Equal instants, and the same offsets (a time without a zone is read as UTC, so that
    # every replica reads the same instant).
    assert offsets(again) == offsets(config) == [timedelta(hours=1), timedelta(0)]


@given(config_dicts())
def test_any_valid_config_survives_the_round_trip(doc: dict[str, Any]) -> None:
    config = parse_config(dump(doc), SOURCE).config
    assert round_trip(config) == config
