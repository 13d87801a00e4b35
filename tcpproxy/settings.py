"""Process settings: CLI flag > TCPPROXY_* environment variable > default.

The route config is never overridden from here: the YAML file is the hot-reloaded truth.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ByteSize,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tcpproxy.config import (
    DEFAULT_CONFIG_SETTLE_S,
    DEFAULT_MAX_CONFIG_BYTES,
    Duration,
    split_host_port,
)
from tcpproxy.metrics import DEFAULT_LINGER_S

_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

DEFAULT_CONFIG_PATH = Path("config/tcpproxy.yaml")
DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_POLL_INTERVAL_S = 30.0
DEFAULT_ADMIN_READ_TIMEOUT_S = 10.0
DEFAULT_ADMIN_MAX_CONNECTIONS = 64
# A token anyone could guess is no token: demand about 96 bits of randomness at least.
ADMIN_TOKEN_MIN_CHARS = 16
ADMIN_TOKEN_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _check_admin(value: str) -> str:
    if value != "off":
        split_host_port(value)
    return value


def check_admin_token(token: str) -> str:
    """The token with surrounding whitespace (a file's final newline) removed; ValueError if
    it is too short to be secret."""
    token = token.strip()
    if len(token) < ADMIN_TOKEN_MIN_CHARS:
        raise ValueError(
            f"the admin token must be at least {ADMIN_TOKEN_MIN_CHARS} characters "
            f"(make one with: {ADMIN_TOKEN_HINT})"
        )
    return token


def read_admin_token(path: Path) -> str:
    """The token in `path`; ValueError with a readable reason when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read {path}: {reason}") from None
    try:
        return check_admin_token(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _check_token_file(path: Path | None) -> Path | None:
    if path is not None:
        read_admin_token(path)
    return path


def _check_token(token: SecretStr | None) -> SecretStr | None:
    if token is not None:
        return SecretStr(check_admin_token(token.get_secret_value()))
    return token


def _split_hosts(value: object) -> object:
    """`a,b` (a flag or an environment variable) -> ("a", "b")."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _check_hosts(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """Bare host names and addresses, lower case, IPv6 without brackets."""
    checked = []
    for host in hosts:
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if bare != "*":
            try:
                ipaddress.ip_address(bare)
            except ValueError:
                if not _HOST_NAME_RE.fullmatch(bare):
                    raise ValueError(
                        f"{host!r} is not a host name or IP address (no port, no scheme)"
                    ) from None
        checked.append(bare.lower())
    return tuple(checked)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TCPPROXY_", extra="forbid", frozen=True)

    config: Path = DEFAULT_CONFIG_PATH
    # host:port, or "off" for no admin server.
    admin: Annotated[str, AfterValidator(_check_admin)] = DEFAULT_ADMIN
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout: Duration = 30.0
    # One log line per closed connection; switch off for very high connection rates.
    access_log: bool = True
    # Fallback re-read of the config file, in case no file event arrives (e.g. some network
    # filesystems). 0 disables it.
    poll_interval: Duration = DEFAULT_POLL_INTERVAL_S
    # Watch the config file's directory for changes (off where inotify is unavailable).
    watch: bool = True
    # How long a drained-away backend's metric series are kept before they are dropped.
    metrics_linger: Duration = DEFAULT_LINGER_S
    # The route config file may be at most this large: bytes, or a number with a unit
    # (512KiB, 1MiB). A larger file is rejected unread.
    max_config_size: Annotated[ByteSize, Field(ge=1)] = ByteSize(DEFAULT_MAX_CONFIG_BYTES)
    # A config file written in place is applied once unchanged for this long (a rename or a
    # ConfigMap swap applies at once), so that a half-written file is never applied.
    config_settle: Duration = DEFAULT_CONFIG_SETTLE_S
    # The admin token, which every state-changing admin request must carry. From a file
    # (a mounted Kubernetes Secret; re-read on each such request, so a rotated Secret
    # applies without a restart) or from the environment; never a command-line value,
    # which any local user could read in the process list.
    admin_token_file: Annotated[Path | None, AfterValidator(_check_token_file)] = None
    admin_token: Annotated[SecretStr | None, AfterValidator(_check_token)] = None
    # Host header values the state-changing endpoints accept besides loopback names and
    # addresses and the admin bind address ("*": any). Stops DNS rebinding.
    admin_allowed_hosts: Annotated[
        tuple[str, ...], NoDecode, BeforeValidator(_split_hosts), AfterValidator(_check_hosts)
    ] = ()
    # A client has this long to send a whole request, from connecting or from its previous
    # answer; then the connection is closed (idle keep-alive connections too).
    admin_read_timeout: Annotated[Duration, Field(gt=0)] = DEFAULT_ADMIN_READ_TIMEOUT_S
    # Open admin connections at most.
    admin_max_connections: Annotated[int, Field(ge=1)] = DEFAULT_ADMIN_MAX_CONNECTIONS
    # The settings given as command-line flags (load_settings), for origin().
    _flags: frozenset[str] = PrivateAttr(default=frozenset())

    def origin(self, field: str) -> str | None:
        """How the user set `field`, as they wrote it (`--admin`, `TCPPROXY_ADMIN`), or None
        when it is the default: a message then names the setting, not a flag never given."""
        if field in self._flags:
            return "--" + field.replace("_", "-")
        if field in self.model_fields_set:
            return f"{self.model_config.get('env_prefix', '')}{field}".upper()
        return None

    def hint_missing_config(self, problems: list[str]) -> list[str]:
        """`problems`, with a hint on "file not found" for a config path nobody chose: it is
        the default, relative to the working directory."""
        if self.origin("config") is not None or self.config.is_absolute():
            return problems
        hint = (
            f" (the default config path, relative to {Path.cwd()}: give one with --config "
            "PATH or TCPPROXY_CONFIG)"
        )
        missing = f"{self.config}: file not found"
        return [problem + hint if problem == missing else problem for problem in problems]

    @model_validator(mode="after")
    def _one_token_source(self) -> Settings:
        if self.admin_token_file is not None and self.admin_token is not None:
            raise ValueError(
                "set the admin token once: TCPPROXY_ADMIN_TOKEN or --admin-token-file "
                "(TCPPROXY_ADMIN_TOKEN_FILE), not both"
            )
        return self


class SettingsError(Exception):
    pass


def load_settings(**overrides: object) -> Settings:
    """Settings from flags (`overrides`, None meaning not given), then env, then defaults."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for item in exc.errors(include_url=False):
            field = str(item["loc"][0]) if item["loc"] else ""
            message = item["msg"].removeprefix("Value error, ")
            if not field:  # a rule across settings: the message names them
                lines.append(message)
                continue
            source = (
                "--" + field.replace("_", "-") if field in given else f"TCPPROXY_{field.upper()}"
            )
            lines.append(f"{source}: {message}")
        raise SettingsError("\n".join(lines)) from None
    settings._flags = frozenset(given)
    return settings
