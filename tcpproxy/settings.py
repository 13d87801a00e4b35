"""Process settings (DESIGN §3): CLI flag > TCPPROXY_* environment variable > default.

The route config is never overridden from here: the YAML file is the hot-reloaded truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tcpproxy.config import Duration, split_host_port
from tcpproxy.metrics import DEFAULT_LINGER_S

DEFAULT_CONFIG_PATH = Path("config/tcpproxy.yaml")
DEFAULT_ADMIN = "127.0.0.1:9901"
DEFAULT_POLL_INTERVAL_S = 30.0


def _check_admin(value: str) -> str:
    if value != "off":
        split_host_port(value)
    return value


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


class SettingsError(Exception):
    pass


def load_settings(**overrides: object) -> Settings:
    """Settings from flags (`overrides`, None meaning not given), then env, then defaults."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for item in exc.errors(include_url=False):
            field = ".".join(str(part) for part in item["loc"])
            source = (
                "--" + field.replace("_", "-") if field in given else f"TCPPROXY_{field.upper()}"
            )
            lines.append(f"{source}: {item['msg'].removeprefix('Value error, ')}")
        raise SettingsError("\n".join(lines)) from None
