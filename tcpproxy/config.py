"""Route config: the hot-reloaded YAML file. Pure: no I/O but `read_config_file`."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from yaml.composer import Composer
from yaml.events import AliasEvent

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# A sign is matched so that "-1" is told it must be >= 0, not that it is no duration.
_DURATION_RE = re.compile(r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h)?\s*")
# Milliseconds divide rather than multiply by 0.001, so that "9ms" is exactly 0.009.
_UNIT_MULTIPLY = {"s": 1, "m": 60, "h": 3600, None: 1}
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")

DEFAULT_DRAIN_TIMEOUT_S = 300.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 3600.0
DEFAULT_MAX_CONNECTIONS = 10_000
# Unless max_connections_per_client is set, one client address may hold this part of
# max_connections (rounded up): one address can never take every slot.
DEFAULT_PER_CLIENT_DIVISOR = 10
DEFAULT_FIRST_BYTE_TIMEOUT_S = 30.0
DEFAULT_HALF_CLOSE_TIMEOUT_S = 60.0


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one ready-to-print line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: object) -> float:
    """Seconds from `30`, `0.5`, `"250ms"`, `"30s"`, `"5m"` or `"1h"`."""
    match = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, bool) or not (isinstance(value, int | float) or match):
        raise ValueError(
            f"invalid duration {value!r}: expected a number of seconds or "
            "a number with a unit (ms, s, m, h)"
        )
    try:
        if match is None:
            seconds = float(value)  # type: ignore[arg-type]  # int or float, checked above
        else:
            number, unit = float(match.group(1)), match.group(2)
            seconds = number / 1000 if unit == "ms" else number * _UNIT_MULTIPLY[unit]
    except OverflowError:
        seconds = float("inf")
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be a finite value >= 0")
    return seconds + 0.0  # "-0" is 0.0, not -0.0


def split_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raises ValueError with a readable reason."""
    if not isinstance(text, str):
        raise ValueError("expected a string host:port")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid address {text!r}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid address {text!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"invalid address {text!r}: write IPv6 addresses as [addr]:port")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"invalid address {text!r}: {host!r} is not a host name or IP")
        if _other_ipv4_spelling(host):
            raise ValueError(
                f"invalid address {text!r}: {host!r} is not an IPv4 address "
                "(four decimal numbers 0-255, no leading zeros)"
            )
    if port_text.isascii() and port_text.isdigit() and port_text[0] == "0" and port_text != "0":
        # "08008" is port 8008 to the socket layer: a second spelling of the same port.
        raise ValueError(f"invalid address {text!r}: port {port_text} has a leading zero")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"invalid address {text!r}: port must be 1-65535")
    return host, int(port_text)


def _other_ipv4_spelling(host: str) -> bool:
    """True for a host that is a number but not a plain IPv4 address: no host name is all
    digits and dots, and the resolver reads "010.0.0.1" as 8.0.0.1 (octal), "127.1" as
    127.0.0.1, "0x7f000001" as 127.0.0.1."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return False
    if not host.strip("0123456789."):
        return True
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _check_address(text: str) -> str:
    split_host_port(text)
    return text


def _every_interface(text: object) -> object:
    """`:8008` (no host, as Go and Envoy write it) is every IPv4 interface: 0.0.0.0:8008."""
    if isinstance(text, str) and text.startswith(":"):
        return "0.0.0.0" + text
    return text


Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
Address = Annotated[str, Field(strict=True), AfterValidator(_check_address)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Model):
    name: Name
    address: Address
    weight: StrictInt = Field(default=1, ge=0)

    @property
    def host(self) -> str:
        return split_host_port(self.address)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.address)[1]


class HealthCheckConfig(_Model):
    """Active checks: connect (and optionally send/expect) to every backend each interval."""

    interval: Annotated[Duration, Field(gt=0)] = 5.0
    timeout: Annotated[Duration, Field(gt=0)] = 1.0
    healthy_threshold: StrictInt = Field(default=2, ge=1)
    unhealthy_threshold: StrictInt = Field(default=3, ge=1)
    send: str | None = None  # sent after connecting, e.g. "PING\r\n"
    expect: str | None = None  # the reply must start with this


class EjectionConfig(_Model):
    """Passive health: after `consecutive_failures` failed connects, no new connections for
    `duration`, then the backend is tried again."""

    consecutive_failures: StrictInt = Field(default=5, ge=1)
    duration: Annotated[Duration, Field(gt=0)] = 30.0


class ProxyProtocolConfig(_Model):
    # Send a PROXY header of this version to backends, so they see the client's address.
    send: Literal["v1", "v2"] | None = None
    # Require a PROXY header (v1 or v2) from every client: a load balancer in front sends it.
    accept: bool = False


def _utc(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC: every replica must read the same instant."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


Instant = Annotated[datetime, AfterValidator(_utc)]


def _http_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise ValueError(f"invalid URL {text!r}: expected http://host:port or https://host/path")
    return text.rstrip("/")


class PrometheusJudgeConfig(_Model):
    """Judge the abort on the whole fleet's numbers, from a Prometheus that scrapes every
    replica."""

    url: Annotated[str, Field(strict=True), AfterValidator(_http_url)]
    # PromQL that gives the failure ratio of connects to `to` (one number); by default the
    # ratio over every replica over `window`, once there were `min_attempts`.
    query: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    # Label matchers added to the default queries' selectors, to tell this fleet's series
    # from another's in the same Prometheus, e.g. 'namespace="shop"'.
    selector: Annotated[str, Field(max_length=1024, pattern=r"^[^{}]*$")] = ""
    interval: Annotated[Duration, Field(gt=0)] = 10.0
    timeout: Annotated[Duration, Field(gt=0)] = 2.0


class RolloutAbortConfig(_Model):
    # Abort when more than this part of the connection attempts to B failed over `window`
    # (once there were at least `min_attempts`), or when B is unhealthy.
    max_failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.2
    window: Annotated[Duration, Field(gt=0)] = 60.0
    min_attempts: StrictInt = Field(default=5, ge=1)
    on_unhealthy: bool = True
    prometheus: PrometheusJudgeConfig | None = None


class RolloutConfig(_Model):
    """Shift new connections from backend `from` to backend `to` in timed steps. The
    operator's decisions (pause, resume, abort) are fields too, so that one edit of the file
    steers every replica that reads it, and a restart or a new replica keeps them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: Name = Field(alias="from")
    to: Name
    steps: tuple[Annotated[StrictInt, Field(ge=0, le=100)], ...]  # B's share in percent
    step_duration: Annotated[Duration, Field(gt=0)]
    # When step 1 began. Set it (ISO 8601) to make restarts resume at the right step; left
    # out, the rollout starts when this config is first applied.
    started_at: Instant | None = None
    # Held since this instant (written by `tcpproxy rollout pause --config`).
    paused_at: Instant | None = None
    # Time spent paused before, which the schedule does not count (written by resume).
    paused_for: Duration = 0.0
    # All of the pair's share back to `from` since this instant (written by abort).
    aborted_at: Instant | None = None
    abort_reason: Annotated[str, Field(max_length=200)] | None = None
    # The whole schedule lies in the past: run it as completed instead of refusing it.
    completed: bool = False
    abort: RolloutAbortConfig = RolloutAbortConfig()

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[int, ...]) -> tuple[int, ...]:
        if not steps:
            raise ValueError("at least one step is required")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must increase")
        return steps

    def identity(self, listener: str) -> str:
        """Names this rollout across replicas and reloads: what it moves and when, not the
        operator's decisions nor the abort thresholds, which may change while it runs."""
        started = self.started_at.isoformat() if self.started_at else ""
        key = f"{listener}|{self.from_}|{self.to}|{self.steps}|{self.step_duration}|{started}"
        return hashlib.sha256(key.encode()).hexdigest()[:12]


class ListenerConfig(_Model):
    name: Name
    bind: Annotated[Address, BeforeValidator(_every_interface)]
    backends: tuple[BackendConfig, ...]
    drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT_S
    connect_timeout: Annotated[Duration, Field(gt=0)] = DEFAULT_CONNECT_TIMEOUT_S
    # 0 disables the idle timeout.
    idle_timeout: Duration = DEFAULT_IDLE_TIMEOUT_S
    max_connections: StrictInt = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)
    # Open connections one client address may hold (the PROXY header's source address with
    # proxy_protocol.accept); 0 = no limit; unset = a tenth of max_connections.
    max_connections_per_client: StrictInt | None = Field(default=None, ge=0)
    # Closed when no byte has moved either way this long after it was accepted; 0 = never.
    first_byte_timeout: Duration = DEFAULT_FIRST_BYTE_TIMEOUT_S
    # Half-closed (one side sent FIN) and no byte moving for this long -> closed; 0 = never.
    half_close_timeout: Duration = DEFAULT_HALF_CLOSE_TIMEOUT_S
    # copy: bytes pass through one user-space buffer; splice: kernel-side os.splice.
    # Fixed for a listener's life: a change applies when its bind changes or on restart.
    engine: Literal["copy", "splice"] = "copy"
    # round_robin: smooth weighted round-robin. client_hash: one client address, one backend
    # (weighted rendezvous hashing; see affinity.py).
    balance: Literal["round_robin", "client_hash"] = "round_robin"
    health_check: HealthCheckConfig | None = None
    proxy_protocol: ProxyProtocolConfig | None = None
    rollout: RolloutConfig | None = None
    ejection: EjectionConfig | None = EjectionConfig()

    @property
    def client_connection_limit(self) -> int:
        """max_connections_per_client in force (0: no limit)."""
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return -(-self.max_connections // DEFAULT_PER_CLIENT_DIVISOR)

    # An "after" validator runs only when every backend is valid, so a bad backend is
    # reported once rather than also as "too few backends" (as Field(min_length) would).
    @field_validator("backends")
    @classmethod
    def _not_empty(cls, backends: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        if not backends:
            raise ValueError("at least one backend is required")
        return backends

    @field_validator("rollout")
    @classmethod
    def _names_backends(cls, rollout: RolloutConfig | None, info: ValidationInfo) -> object:
        backends = {b.name for b in info.data.get("backends", ())}
        if rollout is not None and backends:
            for name in (rollout.from_, rollout.to):
                if name not in backends:
                    raise ValueError(f"{name!r} is not a backend of this listener")
            if rollout.from_ == rollout.to:
                raise ValueError("'from' and 'to' must be different backends")
            weights = {b.name: b.weight for b in info.data.get("backends", ())}
            if weights[rollout.from_] + weights[rollout.to] == 0:
                raise ValueError(
                    f"{rollout.from_!r} and {rollout.to!r} both have weight 0: the rollout "
                    "moves the share they hold together, so it would move nothing"
                )
        return rollout


class RouteConfig(_Model):
    listeners: tuple[ListenerConfig, ...]

    @field_validator("listeners")
    @classmethod
    def _not_empty(cls, listeners: tuple[ListenerConfig, ...]) -> tuple[ListenerConfig, ...]:
        if not listeners:
            raise ValueError("at least one listener is required")
        return listeners


def _duplicates(config: RouteConfig) -> list[str]:
    """Names and binds used twice, each reported at the later use's own path."""
    problems = []
    first_name: dict[str, int] = {}
    first_bind: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(config.listeners):
        where = f"listeners[{i}]"
        if (j := first_name.setdefault(listener.name, i)) != i:
            problems.append(f"{where}.name: {listener.name!r} is already used by listeners[{j}]")
        if (j := first_bind.setdefault(split_host_port(listener.bind), i)) != i:
            problems.append(f"{where}.bind: {listener.bind!r} is already used by listeners[{j}]")
        seen: dict[str, int] = {}
        for k, backend in enumerate(listener.backends):
            if (j := seen.setdefault(backend.name, k)) != k:
                problems.append(
                    f"{where}.backends[{k}].name: {backend.name!r} is already used by backends[{j}]"
                )
    return problems


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config and the identity of the bytes it came from."""

    config: RouteConfig
    sha256: str
    source: str

    def warnings(self) -> list[str]:
        """What is valid but most likely not meant, one line each, like the problems."""
        return [
            f"{self.source}: listeners[{i}].backends: every weight is 0, so no backend takes "
            "new connections: each one is closed at once (rejected as no_backend)"
            for i, listener in enumerate(self.config.listeners)
            if not any(b.weight for b in listener.backends)
        ]


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _format_validation_error(
    source: str, error: ValidationError, at: tuple[int | str, ...] = ()
) -> list[str]:
    """One line per error; `at` is the path of the validated part within the file."""
    problems = []
    for item in error.errors(include_url=False):
        # Pydantic prefixes messages raised in validators with "Value error, ".
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required field is missing"
        where = _location((*at, *item["loc"]))
        problems.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return problems


# -- loading: bounded, for the file comes from whoever can write it -----------------------

# A ConfigMap holds at most 1 MiB; the process setting max_config_size changes it.
DEFAULT_MAX_CONFIG_BYTES = 1 << 20
# YAML nodes, an alias counting as every node it repeats. A real route config is far below
# (a 1 MiB file of backends has about 120,000); an alias bomb of a few KiB is billions.
MAX_CONFIG_NODES = 200_000
# Problems reported one line each; the rest are counted in one more line.
MAX_PROBLEMS = 50
# A file written in place (not replaced by a rename) is applied once it has not changed for
# this long: a writer that pauses mid-file must not have its first half applied.
DEFAULT_CONFIG_SETTLE_S = 1.0

# libyaml's parser when PyYAML has it: 7 times faster than the pure-Python one, and it bounds
# the nesting depth itself.
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _BoundedLoader(_BASE_LOADER):  # type: ignore[misc]
    """PyYAML's safe loader whose composer counts nodes while it builds them, an alias at the
    size of the node it names, and stops past MAX_CONFIG_NODES. PyYAML shares an aliased
    node, so the document itself stays small, but validation walks every alias in full:
    an alias bomb of a few KiB would be billions of nodes to it. Counting while composing
    also bounds the time and memory of composing a dense file."""

    # PyYAML's composer, in Python (libyaml's is in C, where nothing can count).
    check_node = Composer.check_node
    get_node = Composer.get_node
    compose_document = Composer.compose_document
    compose_scalar_node = Composer.compose_scalar_node
    compose_sequence_node = Composer.compose_sequence_node
    compose_mapping_node = Composer.compose_mapping_node

    def __init__(self, data: bytes, source: str) -> None:
        super().__init__(data)
        self.anchors: dict[str, yaml.Node] = {}
        self.source = source
        self.nodes = 0
        self.aliases = 0
        self.sizes: dict[str, int] = {}  # anchor -> nodes in its node, aliases expanded

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_CONFIG_NODES:
            what = "nodes once YAML aliases are expanded" if self.aliases else "YAML nodes"
            raise ConfigError([f"{self.source}: too large: more than {MAX_CONFIG_NODES:,} {what}"])

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self.anchors:  # else PyYAML reports the undefined alias
                size = self.sizes.get(event.anchor)
                if size is None:  # its node is still being composed
                    mark = event.start_mark
                    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
                    raise ConfigError(
                        [
                            f"{self.source}{where}: invalid YAML: an alias inside the node "
                            "it names (a recursive structure)"
                        ]
                    )
                self.aliases += 1
                self._count(size)
            return Composer.compose_node(self, parent, index)
        self._count(1)
        before = self.nodes
        node = Composer.compose_node(self, parent, index)
        if event.anchor is not None:
            self.sizes[event.anchor] = self.nodes - before + 1
        return node


def _load_yaml(data: bytes, source: str) -> list[Any]:
    """Every document of the stream; the node limit holds for all of them together."""
    loader = _BoundedLoader(data, source)
    try:
        documents = []
        while loader.check_node():
            documents.append(loader.construct_document(loader.get_node()))
        return documents
    finally:
        loader.dispose()


def _capped(problems: list[str], source: str) -> list[str]:
    """At most MAX_PROBLEMS lines, then one that counts the rest."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"{source}: and {len(problems) - MAX_PROBLEMS} more problems"]


def parse_config(data: bytes, source: str) -> LoadedConfig:
    """Validate the bytes of a config file; raise ConfigError with one line per problem (at
    most MAX_PROBLEMS, then one line counting the rest)."""
    try:
        documents = _load_yaml(data, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        if context and reason == "second occurrence":
            reason = context.removesuffix("; first occurrence")
        elif context and reason.startswith("but "):
            reason = f"{context}, {reason}"
        raise ConfigError([f"{source}{where}: invalid YAML: {reason}"]) from None
    except RecursionError:  # the pure-Python parser, on deep nesting
        raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None
    except (ValueError, OverflowError) as exc:  # a scalar no Python value can hold
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "integer string conversion" in reason:
            reason = f"an integer of more than {sys.get_int_max_str_digits()} digits"
        raise ConfigError([f"{source}: invalid YAML value: {reason}"]) from None
    present = [document for document in documents if document is not None]
    if not present:
        raise ConfigError([f"{source}: file is empty"])
    # Imported here: k8s_routes builds on this module's models.
    from tcpproxy.k8s_routes import is_route_document, route_config  # noqa: PLC0415

    if len(present) > 1 or is_route_document(present[0]):
        config = route_config(documents, source)
        return LoadedConfig(config, hashlib.sha256(data).hexdigest(), source)
    document = present[0]
    if not isinstance(document, dict):
        raise ConfigError(
            [
                f"{source}: expected a mapping with a 'listeners' key at the top, or "
                "VirtualService / TCPRoute documents"
            ]
        )
    try:
        config = RouteConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_capped(_format_validation_error(source, exc), source)) from None
    if problems := _duplicates(config):
        raise ConfigError(_capped([f"{source}: {problem}" for problem in problems], source))
    return LoadedConfig(config, hashlib.sha256(data).hexdigest(), source)


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The bytes of the config file, and which file they came from when."""

    data: bytes
    sha256: str
    device: int
    inode: int
    mtime_ns: int


def _size_text(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _too_large(path: Path, max_bytes: int) -> ConfigError:
    return ConfigError(
        [
            f"{path}: file is larger than {_size_text(max_bytes)}, the limit "
            "(--max-config-size, TCPPROXY_MAX_CONFIG_SIZE)"
        ]
    )


def _not_regular(path: Path, mode: int) -> ConfigError:
    if stat.S_ISDIR(mode):
        return ConfigError([f"{path}: is a directory, expected a YAML file"])
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return ConfigError([f"{path}: is {kind}, expected a regular file"])


def read_config_file(path: Path, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> ConfigFile:
    """Read the config file: a regular file, or a symlink to one (a mounted ConfigMap is one,
    through `..data`), of at most `max_bytes`. Anything else is a ConfigError naming it."""
    try:
        # stat (following symlinks) before opening: a FIFO or a device is refused unopened,
        # since opening a FIFO waits for a writer and /dev/zero never ends.
        if not stat.S_ISREG((info := os.stat(path)).st_mode):
            raise _not_regular(path, info.st_mode)
        # O_NONBLOCK: should a FIFO be swapped in after the stat, open returns at once, and
        # fstat tells what was opened before a byte is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(path, info.st_mode)
            if info.st_size > max_bytes:
                raise _too_large(path, max_bytes)
            chunks = []
            left = max_bytes + 1  # one byte more tells a file that grew past the limit
            while left > 0 and (chunk := os.read(fd, left)):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise _too_large(path, max_bytes)
    return ConfigFile(
        data, hashlib.sha256(data).hexdigest(), info.st_dev, info.st_ino, info.st_mtime_ns
    )


def read_config_bytes(path: Path, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> bytes:
    """The bytes of the config file (see read_config_file), or a ConfigError naming it."""
    return read_config_file(path, max_bytes).data


def load_config(path: Path, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> LoadedConfig:
    """Read and parse in this process (`tcpproxy run` and `check` parse in a child process:
    see config_worker)."""
    return parse_config(read_config_bytes(path, max_bytes), str(path))
