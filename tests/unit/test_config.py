"""Route config (DESIGN §1): parsing, durations, addresses, names and one-line errors."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    ConfigError,
    LoadedConfig,
    load_config,
    parse_config,
    parse_duration,
    split_host_port,
)

SOURCE = "routes.yaml"

DESIGN_EXAMPLE = b"""\
listeners:
  - name: tcp-echo              # unique; used as the `listener` metrics label
    bind: "0.0.0.0:8008"        # host:port; [::]:8008 for IPv6
    backends:
      - name: v1                # unique within the listener; the `backend` label
        address: "tcp-echo-v1:9000"   # host:port; hostnames resolved at connect time
        weight: 80              # integer >= 0, relative (need not sum to 100)
      - name: v2
        address: "tcp-echo-v2:9000"
        weight: 20
    drain_timeout: 300s         # optional; removed backends' connections are closed after this
    connect_timeout: 5s         # optional
    idle_timeout: 1h            # optional; no bytes either way for this long -> close
    max_connections: 10000      # optional; over it new connections are refused and counted
"""

LISTENER_KEYS = frozenset(
    {
        "name",
        "bind",
        "backends",
        "drain_timeout",
        "connect_timeout",
        "idle_timeout",
        "max_connections",
        "engine",
        "balance",
    }
)
BACKEND_KEYS = frozenset({"name", "address", "weight"})
TOP_KEYS = frozenset({"listeners"})


# -- helpers ------------------------------------------------------------------------------


def backend(name: str = "v1", address: str = "10.0.0.1:9000", weight: object = 1) -> dict[str, Any]:
    return {"name": name, "address": address, "weight": weight}


def listener(
    name: str = "edge",
    bind: str = "127.0.0.1:8008",
    backends: list[dict[str, Any]] | None = None,
    **options: object,
) -> dict[str, Any]:
    if backends is None:
        backends = [backend("v1", "10.0.0.1:9000", 80), backend("v2", "10.0.0.2:9000", 20)]
    return {"name": name, "bind": bind, "backends": backends, **options}


def document(*listeners: dict[str, Any]) -> dict[str, Any]:
    return {"listeners": list(listeners) or [listener()]}


def dump(doc: object) -> bytes:
    return yaml.safe_dump(doc, sort_keys=False).encode()


def parse(doc: object) -> LoadedConfig:
    return parse_config(dump(doc), SOURCE)


def problems_of_bytes(data: bytes, source: str = SOURCE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source)
    return info.value.problems


def problems_of(doc: object) -> list[str]:
    return problems_of_bytes(dump(doc))


def assert_clean_line(line: str, source: str = SOURCE) -> None:
    """A problem a user sees: one line, starting with the file name, no traceback text."""
    assert line.startswith(f"{source}:"), line
    assert "\n" not in line
    assert "Traceback" not in line
    assert "pydantic" not in line.lower()
    assert "https://" not in line


def assert_one_line_error(error: ConfigError, source: str = SOURCE) -> str:
    assert len(error.problems) == 1, error.problems
    (line,) = error.problems
    assert_clean_line(line, source)
    assert str(error) == line
    return line


def lines_at(problems: list[str], path: str) -> list[str]:
    prefix = f"{SOURCE}: {path}: "
    return [line for line in problems if line.startswith(prefix)]


# -- every field of DESIGN §1 -------------------------------------------------------------


def test_design_example_parses_every_field() -> None:
    loaded = parse_config(DESIGN_EXAMPLE, SOURCE)

    assert loaded.source == SOURCE
    assert loaded.sha256 == hashlib.sha256(DESIGN_EXAMPLE).hexdigest()
    (lst,) = loaded.config.listeners
    assert lst.name == "tcp-echo"
    assert lst.bind == "0.0.0.0:8008"
    assert [(b.name, b.address, b.weight) for b in lst.backends] == [
        ("v1", "tcp-echo-v1:9000", 80),
        ("v2", "tcp-echo-v2:9000", 20),
    ]
    assert (lst.backends[0].host, lst.backends[0].port) == ("tcp-echo-v1", 9000)
    assert lst.drain_timeout == 300.0
    assert lst.connect_timeout == 5.0
    assert lst.idle_timeout == 3600.0
    assert lst.max_connections == 10000


def test_optional_listener_fields_take_defaults() -> None:
    (lst,) = parse(document(listener())).config.listeners

    assert lst.drain_timeout == DEFAULT_DRAIN_TIMEOUT_S
    assert lst.connect_timeout == DEFAULT_CONNECT_TIMEOUT_S
    assert lst.idle_timeout == DEFAULT_IDLE_TIMEOUT_S
    assert lst.max_connections == DEFAULT_MAX_CONNECTIONS
    assert lst.balance == "round_robin"


def test_balance_is_round_robin_or_client_hash() -> None:
    for balance in ("round_robin", "client_hash"):
        (lst,) = parse(document(listener(balance=balance))).config.listeners
        assert lst.balance == balance
    for bad in ("source", "", 1, None):
        assert problems_of(document(listener(balance=bad))) == [
            f"{SOURCE}: listeners[0].balance: Input should be 'round_robin' or 'client_hash'"
        ]


def test_several_listeners_keep_file_order() -> None:
    doc = document(
        listener("a", "127.0.0.1:8001"),
        listener("b", "127.0.0.1:8002"),
        listener("c", "[::]:8003"),
    )

    assert [lst.name for lst in parse(doc).config.listeners] == ["a", "b", "c"]


def test_sha256_changes_with_the_bytes_even_for_equal_configs() -> None:
    first = parse_config(DESIGN_EXAMPLE, SOURCE)
    second = parse_config(DESIGN_EXAMPLE + b"# a comment\n", SOURCE)

    assert first.config == second.config
    assert first.sha256 != second.sha256


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.write_bytes(DESIGN_EXAMPLE)

    loaded = load_config(path)

    assert loaded.source == str(path)
    assert loaded.sha256 == hashlib.sha256(DESIGN_EXAMPLE).hexdigest()
    assert loaded.config.listeners[0].name == "tcp-echo"


# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (0.5, 0.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        ("30", 30.0),
        ("0ms", 0.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "5 parsecs",
        -1,
        -0.5,
        "-1s",
        True,
        False,
        "inf",
        "infs",
        float("inf"),
        float("nan"),
        "nan",
        "",
        "s",
        "30S",
        "1d",
        "1e3",
        None,
        [30],
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("yaml_value", "seconds"),
    [("30", 30.0), ("0.5", 0.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0)],
)
@pytest.mark.parametrize("field", ["drain_timeout", "connect_timeout", "idle_timeout"])
def test_durations_in_yaml(field: str, yaml_value: str, seconds: float) -> None:
    text = DESIGN_EXAMPLE.decode()
    text = re.sub(rf"{field}: \S+", f"{field}: {yaml_value}", text)

    (lst,) = parse_config(text.encode(), SOURCE).config.listeners

    assert getattr(lst, field) == seconds


@pytest.mark.parametrize("yaml_value", ["5 parsecs", "-1", "true", '"inf"', ".inf", ".nan", "[1]"])
@pytest.mark.parametrize("field", ["drain_timeout", "connect_timeout", "idle_timeout"])
def test_bad_durations_in_yaml_are_one_line_naming_the_field(field: str, yaml_value: str) -> None:
    text = re.sub(rf"{field}: \S+", f"{field}: {yaml_value}", DESIGN_EXAMPLE.decode())

    problems = problems_of_bytes(text.encode())

    assert lines_at(problems, f"listeners[0].{field}"), problems
    for line in problems:
        assert_clean_line(line)


def test_connect_timeout_must_be_positive() -> None:
    problems = problems_of(document(listener(connect_timeout=0)))

    assert lines_at(problems, "listeners[0].connect_timeout")


def test_zero_drain_and_idle_timeouts_are_allowed() -> None:
    (lst,) = parse(document(listener(drain_timeout=0, idle_timeout="0s"))).config.listeners

    assert (lst.drain_timeout, lst.idle_timeout) == (0.0, 0.0)


def test_huge_integer_duration_is_a_config_error_not_a_crash() -> None:
    # YAML integers are unbounded; float() of one too large raises OverflowError.
    text = re.sub(r"drain_timeout: \S+", "drain_timeout: 1" + "0" * 400, DESIGN_EXAMPLE.decode())

    with pytest.raises(ConfigError) as info:
        parse_config(text.encode(), SOURCE)

    line = assert_one_line_error(info.value)
    assert line.startswith(f"{SOURCE}: listeners[0].drain_timeout: ")


@given(st.integers(min_value=0, max_value=10**9))
def test_milliseconds_are_exact(n: int) -> None:
    assert parse_duration(f"{n}ms") == n / 1000


@given(st.integers(min_value=0, max_value=10**9))
def test_seconds_minutes_hours_scale_integers_exactly(n: int) -> None:
    assert parse_duration(n) == n
    assert parse_duration(str(n)) == n
    assert parse_duration(f"{n}s") == n
    assert parse_duration(f"{n}m") == n * 60
    assert parse_duration(f"{n}h") == n * 3600


# -- unknown keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.__setitem__("colour", "blue"), "colour"),
        (lambda d: d["listeners"][0].__setitem__("colour", "blue"), "listeners[0].colour"),
        (lambda d: d["listeners"][1].__setitem__("colour", "blue"), "listeners[1].colour"),
        (
            lambda d: d["listeners"][0]["backends"][1].__setitem__("colour", "blue"),
            "listeners[0].backends[1].colour",
        ),
        (
            lambda d: d["listeners"][1]["backends"][0].__setitem__("colour", "blue"),
            "listeners[1].backends[0].colour",
        ),
    ],
    ids=["top", "listener0", "listener1", "backend01", "backend10"],
)
def test_unknown_key_is_named_with_its_exact_path(mutate: Any, path: str) -> None:
    doc = document(listener("a", "127.0.0.1:8001"), listener("b", "127.0.0.1:8002"))
    mutate(doc)

    problems = problems_of(doc)

    assert f"{SOURCE}: {path}: unknown key" in problems
    for line in problems:
        assert_clean_line(line)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["listeners"][0]["backends"][1].__setitem__("colour", "blue"),
            f"{SOURCE}: listeners[0].backends[1].colour: unknown key",
        ),
        (
            lambda d: d["listeners"][0].__setitem__("colour", "blue"),
            f"{SOURCE}: listeners[0].colour: unknown key",
        ),
        (
            lambda d: d["listeners"][0]["backends"][0].__setitem__("weight", "80"),
            None,
        ),
        (
            lambda d: d["listeners"][0]["backends"][1].__setitem__("address", "nohost"),
            None,
        ),
        (lambda d: d["listeners"][0].__setitem__("drain_timeout", "5 parsecs"), None),
    ],
    ids=["backend-unknown-key", "listener-unknown-key", "weight", "address", "duration"],
)
def test_one_problem_gives_exactly_one_line(mutate: Any, expected: str | None) -> None:
    # DESIGN §1: "one line per problem". A single bad field in the only backend / listener
    # must not add lines such as "listeners: Tuple should have at least 1 item".
    doc = document(listener())
    mutate(doc)

    with pytest.raises(ConfigError) as info:
        parse(doc)

    line = assert_one_line_error(info.value)
    if expected is not None:
        assert line == expected


def test_two_problems_give_two_lines() -> None:
    doc = document(
        listener(
            "a",
            "127.0.0.1:8001",
            backends=[backend("v1", "10.0.0.1:1", "80"), backend("v2", "10.0.0.1:2", 1.5)],
        ),
        listener("b", "127.0.0.1:8002"),
    )

    problems = problems_of(doc)

    assert lines_at(problems, "listeners[0].backends[0].weight")
    assert lines_at(problems, "listeners[0].backends[1].weight")


# -- names --------------------------------------------------------------------------------

GOOD_NAMES = ["v1", "tcp-echo", "a.b_c-1", "V", "0", "...", "A_Z.09-"]
BAD_NAMES = ["", "has space", "a/b", "ü", "v1\n", "a:b", "x*", "tab\there", "名前"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    doc = document(listener(name, backends=[backend(name)]))

    (lst,) = parse(doc).config.listeners

    assert lst.name == name
    assert lst.backends[0].name == name


@pytest.mark.parametrize("name", [*BAD_NAMES, 123, None])
def test_bad_listener_name(name: object) -> None:
    doc = document(listener())
    doc["listeners"][0]["name"] = name

    assert lines_at(problems_of(doc), "listeners[0].name")


@pytest.mark.parametrize("name", [*BAD_NAMES, 123, None])
def test_bad_backend_name(name: object) -> None:
    doc = document(listener())
    doc["listeners"][0]["backends"][1]["name"] = name

    assert lines_at(problems_of(doc), "listeners[0].backends[1].name")


@pytest.mark.parametrize(
    ("where", "key"),
    [((), "listeners"), ((0,), "name"), ((0,), "bind"), ((0,), "backends")],
)
def test_missing_required_field(where: tuple[int, ...], key: str) -> None:
    doc = document(listener())
    target: dict[str, Any] = doc if not where else doc["listeners"][where[0]]
    del target[key]
    path = key if not where else f"listeners[{where[0]}].{key}"

    assert f"{SOURCE}: {path}: required field is missing" in problems_of(doc)


@pytest.mark.parametrize("key", ["name", "address"])
def test_missing_backend_field(key: str) -> None:
    doc = document(listener())
    del doc["listeners"][0]["backends"][1][key]

    assert f"{SOURCE}: listeners[0].backends[1].{key}: required field is missing" in (
        problems_of(doc)
    )


def test_empty_listeners_and_backends_are_rejected() -> None:
    assert lines_at(problems_of({"listeners": []}), "listeners")
    assert lines_at(problems_of(document(listener(backends=[]))), "listeners[0].backends")


# -- addresses ----------------------------------------------------------------------------

GOOD_ADDRESSES = [
    ("host:80", ("host", 80)),
    ("0.0.0.0:8008", ("0.0.0.0", 8008)),
    ("[::]:8008", ("::", 8008)),
    ("[::1]:8008", ("::1", 8008)),
    ("tcp-echo-v1:9000", ("tcp-echo-v1", 9000)),
    ("h:1", ("h", 1)),
    ("h:65535", ("h", 65535)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
]
BAD_ADDRESSES = [
    "host",
    "host:",
    ":80",
    "h:0",
    "h:65536",
    "h:99999999",
    "h:-1",
    "h:http",
    "h:80:80",
    "::1:8008",
    "[::1]",
    "[::1]8008",
    "[zz]:80",
    "[127.0.0.1]:80",
    "",
]


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", BAD_ADDRESSES)
def test_split_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="address"):
        split_host_port(text)


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES)
def test_good_bind_and_backend_address(text: str, expected: tuple[str, int]) -> None:
    doc = document(listener(bind=text, backends=[backend(address=text)]))

    (lst,) = parse(doc).config.listeners

    assert lst.bind == text
    assert (lst.backends[0].host, lst.backends[0].port) == expected


# ":80" is a bind on every interface (test_a_bind_without_a_host_is_every_interface).
@pytest.mark.parametrize("text", [*(a for a in BAD_ADDRESSES if a != ":80"), 8008])
def test_bad_bind_is_one_line_naming_the_field(text: object) -> None:
    doc = document(listener())
    doc["listeners"][0]["bind"] = text

    problems = problems_of(doc)

    assert lines_at(problems, "listeners[0].bind")
    for line in problems:
        assert_clean_line(line)


@pytest.mark.parametrize("text", [*BAD_ADDRESSES, 9000])
def test_bad_backend_address_names_the_field(text: object) -> None:
    doc = document(listener())
    doc["listeners"][0]["backends"][1]["address"] = text

    assert lines_at(problems_of(doc), "listeners[0].backends[1].address")


@pytest.mark.parametrize("text", ["h:\uff18\uff10", "h:\u0668\u0660", " :80", "\t:80"])
def test_address_rejects_non_ascii_port_digits_and_blank_host(text: str) -> None:
    # str.isdigit() is true for fullwidth and Arabic-Indic digits, and int() accepts them.
    with pytest.raises(ValueError, match="address"):
        split_host_port(text)


# -- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, 1, 80, 1000, 10**6])
def test_good_weights(weight: int) -> None:
    doc = document(listener(backends=[backend(weight=weight)]))

    assert parse(doc).config.listeners[0].backends[0].weight == weight


@pytest.mark.parametrize("weight", ["80", 1.5, 80.0, True, False, -1, None, "abc", [1]])
def test_bad_weights_name_the_field(weight: object) -> None:
    doc = document(listener())
    doc["listeners"][0]["backends"][1]["weight"] = weight

    assert lines_at(problems_of(doc), "listeners[0].backends[1].weight")


@pytest.mark.parametrize("value", [0, -1, "10", 1.5, True])
def test_bad_max_connections(value: object) -> None:
    assert lines_at(
        problems_of(document(listener(max_connections=value))), "listeners[0].max_connections"
    )


# -- duplicates ---------------------------------------------------------------------------


def test_duplicate_listener_names_are_rejected() -> None:
    doc = document(listener("edge", "127.0.0.1:8001"), listener("edge", "127.0.0.1:8002"))

    problems = problems_of(doc)

    assert problems == ["routes.yaml: listeners[1].name: 'edge' is already used by listeners[0]"]
    for line in problems:
        assert_clean_line(line)


def test_duplicate_binds_are_rejected() -> None:
    doc = document(listener("a", "127.0.0.1:8001"), listener("b", "127.0.0.1:8001"))

    problems = problems_of(doc)

    assert any("127.0.0.1:8001" in line for line in problems), problems
    for line in problems:
        assert_clean_line(line)


def test_same_port_with_leading_zero_is_a_duplicate_bind() -> None:
    # "8008" and "08008" are the same port; two listeners would collide at bind time.
    doc = document(listener("a", "127.0.0.1:8008"), listener("b", "127.0.0.1:08008"))

    with pytest.raises(ConfigError):
        parse(doc)


def test_duplicate_backend_names_in_a_listener_are_rejected() -> None:
    doc = document(
        listener("a", "127.0.0.1:8001"),
        listener(
            "b",
            "127.0.0.1:8002",
            backends=[backend("v1", "10.0.0.1:1"), backend("v1", "10.0.0.2:2")],
        ),
    )

    problems = problems_of(doc)

    assert any(
        line.startswith(f"{SOURCE}: listeners[1]") and "'v1'" in line for line in problems
    ), problems


def test_same_backend_name_in_two_listeners_and_shared_addresses_are_fine() -> None:
    doc = document(
        listener("a", "127.0.0.1:8001", backends=[backend("v1", "10.0.0.1:1")]),
        listener(
            "b",
            "127.0.0.1:8002",
            backends=[backend("v1", "10.0.0.1:1"), backend("v2", "10.0.0.1:1")],
        ),
    )

    assert len(parse(doc).config.listeners) == 2


# -- file-level problems: exactly one line, naming the file ------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (b"# only a comment\n", "empty"),
        (b"- name: a\n- name: b\n", "mapping"),
        (b"just a string\n", "mapping"),
        (b"42\n", "mapping"),
        (b"\xff\xfe\x00garbage", ""),
    ],
)
def test_file_level_problems_are_one_line(data: bytes, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)

    line = assert_one_line_error(info.value)
    assert needle in line


def test_yaml_syntax_error_reports_line_and_column() -> None:
    data = b"listeners:\n  - name: a\n    bind: [unclosed\n  - name: b\n"

    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)

    line = assert_one_line_error(info.value)
    match = re.match(rf"^{re.escape(SOURCE)}:(\d+):(\d+): invalid YAML: \S", line)
    assert match is not None, line
    assert int(match.group(1)) >= 3
    assert int(match.group(2)) >= 1


def test_yaml_tab_indentation_error_has_position() -> None:
    data = b"listeners:\n\t- name: a\n"

    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)

    line = assert_one_line_error(info.value)
    assert re.match(rf"^{re.escape(SOURCE)}:2:1: invalid YAML: ", line), line


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    line = assert_one_line_error(info.value, str(path))
    assert "not found" in line


def test_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)

    line = assert_one_line_error(info.value, str(tmp_path))
    assert "directory" in line


def test_empty_file_on_disk_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_bytes(b"")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert assert_one_line_error(info.value, str(path)) == f"{path}: file is empty"


# -- hypothesis: generated valid configs ----------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.sampled_from(["[::]", "[::1]", "[2001:db8::2]"]),
)
addresses = st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(1, 65535))
durations = st.one_of(
    st.integers(0, 10**6),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
    st.builds(
        lambda n, u: f"{n}{u}", st.integers(0, 10**4), st.sampled_from(["ms", "s", "m", "h"])
    ),
)


@st.composite
def backend_dicts(draw: st.DrawFn, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": draw(addresses),
        "weight": draw(st.integers(0, 1000)),
    }


@st.composite
def listener_dicts(draw: st.DrawFn, name: str, bind: str) -> dict[str, Any]:
    backend_names = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    out: dict[str, Any] = {
        "name": name,
        "bind": bind,
        "backends": [draw(backend_dicts(n)) for n in backend_names],
    }
    if draw(st.booleans()):
        out["drain_timeout"] = draw(durations)
    if draw(st.booleans()):
        out["idle_timeout"] = draw(durations)
    if draw(st.booleans()):
        out["connect_timeout"] = draw(st.integers(1, 600))
    if draw(st.booleans()):
        out["max_connections"] = draw(st.integers(1, 10**6))
    if draw(st.booleans()):
        out["balance"] = draw(st.sampled_from(["round_robin", "client_hash"]))
    return out


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[str, Any]:
    listener_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    binds = draw(
        st.lists(addresses, min_size=len(listener_names), max_size=len(listener_names), unique=True)
    )
    return {
        "listeners": [
            draw(listener_dicts(n, b)) for n, b in zip(listener_names, binds, strict=True)
        ]
    }


@given(config_dicts())
def test_any_valid_config_parses_and_round_trips(doc: dict[str, Any]) -> None:
    config = parse(doc).config

    assert [lst.name for lst in config.listeners] == [d["name"] for d in doc["listeners"]]
    for lst, expected in zip(config.listeners, doc["listeners"], strict=True):
        assert lst.bind == expected["bind"]
        assert [(b.name, b.address, b.weight) for b in lst.backends] == [
            (b["name"], b["address"], b["weight"]) for b in expected["backends"]
        ]
        for field in ("drain_timeout", "idle_timeout", "connect_timeout"):
            assert getattr(lst, field) >= 0
            if field in expected:
                assert getattr(lst, field) == pytest.approx(parse_duration(expected[field]))
        if "max_connections" in expected:
            assert lst.max_connections == expected["max_connections"]
        assert lst.balance == expected.get("balance", "round_robin")


unknown_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,11}", fullmatch=True)


@given(config_dicts(), st.data())
def test_any_inserted_unknown_key_is_reported_with_its_path(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    doc = copy.deepcopy(doc)
    level = data.draw(st.sampled_from(["top", "listener", "backend"]))
    if level == "top":
        target, path, known = doc, "", TOP_KEYS
    else:
        i = data.draw(st.integers(0, len(doc["listeners"]) - 1))
        target, path, known = doc["listeners"][i], f"listeners[{i}].", LISTENER_KEYS
        if level == "backend":
            j = data.draw(st.integers(0, len(target["backends"]) - 1))
            target, path, known = target["backends"][j], f"{path}backends[{j}].", BACKEND_KEYS
    key = data.draw(unknown_keys.filter(lambda k: k not in known))
    target[key] = data.draw(st.one_of(st.integers(), st.text(max_size=5), st.none()))

    problems = problems_of(doc)

    assert f"{SOURCE}: {path}{key}: unknown key" in problems


# -- what a newcomer writes ------------------------------------------------------------------


def one_listener(**options: object) -> dict[str, object]:
    return {
        "listeners": [
            {
                "name": "app",
                "bind": "127.0.0.1:8008",
                "backends": [{"name": "v1", "address": "h1:9000", "weight": 1}],
                **options,
            }
        ]
    }


def test_a_bind_without_a_host_is_every_interface() -> None:
    (listener,) = parse(one_listener(bind=":8008")).config.listeners
    assert listener.bind == "0.0.0.0:8008"
    # As written with the host: the same listener, so a reload between them changes nothing.
    assert (
        parse(one_listener(bind="0.0.0.0:8008")).config == parse(one_listener(bind=":8008")).config
    )
    assert lines_at(problems_of(one_listener(bind=":0")), "listeners[0].bind")


@pytest.mark.parametrize("value", ["-1", "-1s", "-0.5", -1, -0.5])
def test_a_negative_duration_is_told_it_must_not_be(value: object) -> None:
    with pytest.raises(ValueError, match=r"must be a finite value >= 0"):
        parse_duration(value)


def test_minus_zero_is_zero() -> None:
    assert str(parse_duration("-0")) == "0.0"


def test_all_weights_zero_is_valid_with_a_warning_naming_the_listener() -> None:
    doc = one_listener()
    doc["listeners"].append(  # type: ignore[attr-defined]
        {
            "name": "dark",
            "bind": "127.0.0.1:8009",
            "backends": [
                {"name": "v1", "address": "h1:9000", "weight": 0},
                {"name": "v2", "address": "h2:9000", "weight": 0},
            ],
        }
    )
    (warning,) = parse(doc).warnings()
    assert warning.startswith(f"{SOURCE}: listeners[1].backends: every weight is 0")
    assert_clean_line(warning)
    assert parse(one_listener()).warnings() == []
    # A rollout splits the weight its two backends hold together: none is an error.
    rollout = {"from": "v1", "to": "v2", "steps": [50], "step_duration": "1m"}
    doc["listeners"][1]["rollout"] = rollout  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse(doc)
    (problem,) = info.value.problems
    assert problem.startswith(f"{SOURCE}: listeners[1].rollout: 'v1' and 'v2' both have weight 0")
    assert_clean_line(problem)
