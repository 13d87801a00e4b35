"""Route config: the hot-reloaded YAML file (DESIGN §1). Pure: no I/O but `read_config`."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
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
    model_validator,
)

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

DEFAULT_DRAIN_TIMEOUT_S = 300.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 3600.0
DEFAULT_MAX_CONNECTIONS = 10_000


class ConfigError(Exception):
    """A config that cannot be used; `problems` holds one ready-to-print line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: object) -> float:
    """Seconds from `30`, `0.5`, `"250ms"`, `"30s"`, `"5m"` or `"1h"`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, 0.5, 250ms, 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(
            f"invalid duration {value!r}: expected a number of seconds or "
            "a number with a unit (ms, s, m, h)"
        )
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be a finite value >= 0")
    return seconds


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
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid address {text!r}: port must be 1-65535")
    return host, int(port_text)


def _check_address(text: str) -> str:
    split_host_port(text)
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


class ListenerConfig(_Model):
    name: Name
    bind: Address
    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT_S
    connect_timeout: Annotated[Duration, Field(gt=0)] = DEFAULT_CONNECT_TIMEOUT_S
    # 0 disables the idle timeout.
    idle_timeout: Duration = DEFAULT_IDLE_TIMEOUT_S
    max_connections: StrictInt = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)
    engine: Literal["copy"] = "copy"

    @model_validator(mode="after")
    def _unique_backend_names(self) -> ListenerConfig:
        seen: set[str] = set()
        for backend in self.backends:
            if backend.name in seen:
                raise ValueError(f"backend name {backend.name!r} is used twice")
            seen.add(backend.name)
        return self


class RouteConfig(_Model):
    listeners: tuple[ListenerConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_listeners(self) -> RouteConfig:
        names: set[str] = set()
        binds: set[str] = set()
        for listener in self.listeners:
            if listener.name in names:
                raise ValueError(f"listener name {listener.name!r} is used twice")
            if listener.bind in binds:
                raise ValueError(f"bind {listener.bind!r} is used by two listeners")
            names.add(listener.name)
            binds.add(listener.bind)
        return self


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config and the identity of the bytes it came from."""

    config: RouteConfig
    sha256: str
    source: str


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _format_validation_error(source: str, error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors(include_url=False):
        # Pydantic prefixes messages raised in validators with "Value error, ".
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required field is missing"
        where = _location(tuple(item["loc"]))
        problems.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return problems


def parse_config(data: bytes, source: str) -> LoadedConfig:
    """Validate the bytes of a config file; raise ConfigError with one line per problem."""
    try:
        document: Any = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{source}{where}: invalid YAML: {reason}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: not UTF-8 text"]) from None
    if document is None:
        raise ConfigError([f"{source}: file is empty"])
    if not isinstance(document, dict):
        raise ConfigError([f"{source}: expected a mapping with a 'listeners' key at the top"])
    try:
        config = RouteConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None
    return LoadedConfig(config, hashlib.sha256(data).hexdigest(), source)


def read_config_bytes(path: Path) -> bytes:
    """Read the file, turning OS errors into a ConfigError naming the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, expected a YAML file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None


def load_config(path: Path) -> LoadedConfig:
    return parse_config(read_config_bytes(path), str(path))
