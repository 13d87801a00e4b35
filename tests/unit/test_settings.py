"""Process settings (DESIGN §3): CLI flag > TCPPROXY_* env > default."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tcpproxy.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment with no TCPPROXY_* variables."""
    for name in list(os.environ):
        if name.upper().startswith("TCPPROXY_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()

    assert settings.config == Path("config/tcpproxy.yaml")
    assert settings.admin == "127.0.0.1:9901"
    assert settings.log_level == "info"
    assert settings.log_format == "text"
    assert settings.shutdown_timeout == 30.0


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        (
            "TCPPROXY_CONFIG",
            "/etc/tcpproxy/routes.yaml",
            "config",
            Path("/etc/tcpproxy/routes.yaml"),
        ),
        ("TCPPROXY_ADMIN", "0.0.0.0:9000", "admin", "0.0.0.0:9000"),
        ("TCPPROXY_ADMIN", "[::1]:9901", "admin", "[::1]:9901"),
        ("TCPPROXY_ADMIN", "off", "admin", "off"),
        ("TCPPROXY_LOG_LEVEL", "debug", "log_level", "debug"),
        ("TCPPROXY_LOG_FORMAT", "json", "log_format", "json"),
        ("TCPPROXY_SHUTDOWN_TIMEOUT", "5m", "shutdown_timeout", 300.0),
        ("TCPPROXY_SHUTDOWN_TIMEOUT", "250ms", "shutdown_timeout", 0.25),
        ("TCPPROXY_SHUTDOWN_TIMEOUT", "12", "shutdown_timeout", 12.0),
    ],
)
def test_env_overrides_default(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(env, value)

    assert getattr(load_settings(), field) == expected


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_CONFIG", "/from/env.yaml")
    monkeypatch.setenv("TCPPROXY_ADMIN", "0.0.0.0:9000")
    monkeypatch.setenv("TCPPROXY_LOG_LEVEL", "debug")
    monkeypatch.setenv("TCPPROXY_LOG_FORMAT", "json")
    monkeypatch.setenv("TCPPROXY_SHUTDOWN_TIMEOUT", "5m")

    settings = load_settings(
        config=Path("/from/flag.yaml"),
        admin="127.0.0.1:1234",
        log_level="error",
        log_format="text",
        shutdown_timeout="2s",
    )

    assert settings.config == Path("/from/flag.yaml")
    assert settings.admin == "127.0.0.1:1234"
    assert settings.log_level == "error"
    assert settings.log_format == "text"
    assert settings.shutdown_timeout == 2.0


def test_flag_given_as_none_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_ADMIN", "0.0.0.0:9000")

    settings = load_settings(admin=None, log_format=None, shutdown_timeout=None)

    assert settings.admin == "0.0.0.0:9000"
    assert settings.log_format == "text"
    assert settings.shutdown_timeout == 30.0


def test_flags_override_defaults_without_env() -> None:
    settings = load_settings(admin="off", log_format="json", shutdown_timeout=0)

    assert (settings.admin, settings.log_format, settings.shutdown_timeout) == ("off", "json", 0.0)


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_SHUTDOWN_TIMEOUT", "5 parsecs")

    with pytest.raises(SettingsError) as info:
        load_settings()

    message = str(info.value)
    assert message.startswith("TCPPROXY_SHUTDOWN_TIMEOUT: ")
    assert "\n" not in message
    assert "Traceback" not in message


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(shutdown_timeout="5 parsecs")

    message = str(info.value)
    assert message.startswith("--shutdown-timeout: ")
    assert "\n" not in message


def test_bad_env_value_is_ignored_when_a_flag_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_SHUTDOWN_TIMEOUT", "5 parsecs")

    assert load_settings(shutdown_timeout="1s").shutdown_timeout == 1.0


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("TCPPROXY_ADMIN", "nope"),
        ("TCPPROXY_ADMIN", "127.0.0.1:0"),
        ("TCPPROXY_LOG_LEVEL", "loud"),
        ("TCPPROXY_LOG_FORMAT", "xml"),
        ("TCPPROXY_SHUTDOWN_TIMEOUT", "-1"),
        ("TCPPROXY_SHUTDOWN_TIMEOUT", "inf"),
    ],
)
def test_bad_env_values(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)

    with pytest.raises(SettingsError, match=f"^{env}: "):
        load_settings()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("admin", "nope"),
        ("admin", "::1:9901"),
        ("log_level", "loud"),
        ("log_format", "xml"),
        ("shutdown_timeout", -1),
        ("shutdown_timeout", "inf"),
    ],
)
def test_bad_flag_values(flag: str, value: object) -> None:
    option = "--" + flag.replace("_", "-")

    with pytest.raises(SettingsError, match=f"^{option}: "):
        load_settings(**{flag: value})


def test_admin_off_is_accepted() -> None:
    assert load_settings(admin="off").admin == "off"


def test_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(ValueError, match="frozen"):
        settings.admin = "off"


def test_unrelated_tcpproxy_env_vars_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kubernetes injects service links such as TCPPROXY_PORT for a Service named tcpproxy.
    monkeypatch.setenv("TCPPROXY_PORT", "tcp://10.0.0.1:8008")
    monkeypatch.setenv("TCPPROXY_SERVICE_HOST", "10.0.0.1")

    assert isinstance(load_settings(), Settings)


def test_admin_defaults() -> None:
    settings = load_settings()

    assert settings.admin_token is None
    assert settings.admin_token_file is None
    assert settings.admin_allowed_hosts == ()
    assert settings.admin_read_timeout == 10.0
    assert settings.admin_max_connections == 64


def test_admin_allowed_hosts_from_env_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_ADMIN_ALLOWED_HOSTS", "tcpproxy-admin, Admin.Example ,10.0.0.7")

    assert load_settings().admin_allowed_hosts == ("tcpproxy-admin", "admin.example", "10.0.0.7")
    assert load_settings(admin_allowed_hosts="*").admin_allowed_hosts == ("*",)
    assert load_settings(admin_allowed_hosts="[::2]").admin_allowed_hosts == ("::2",)


@pytest.mark.parametrize("value", ["http://x", "host:9901", "a b"])
def test_admin_allowed_hosts_are_bare_hosts(value: str) -> None:
    with pytest.raises(SettingsError, match=r"^--admin-allowed-hosts: .*not a host name"):
        load_settings(admin_allowed_hosts=value)


def test_admin_token_from_env_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_ADMIN_TOKEN", "  0123456789abcdef-long-enough\n")

    settings = load_settings()

    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "0123456789abcdef-long-enough"
    assert "0123456789" not in repr(settings)


def test_a_short_admin_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_ADMIN_TOKEN", "admin")

    with pytest.raises(SettingsError, match=r"^TCPPROXY_ADMIN_TOKEN: .*at least 16 characters"):
        load_settings()


def test_admin_token_file_must_be_readable_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(
        SettingsError, match="^--admin-token-file: cannot read " + re.escape(str(path))
    ):
        load_settings(admin_token_file=path)
    path.write_text("short\n")
    with pytest.raises(SettingsError, match="at least 16 characters"):
        load_settings(admin_token_file=path)
    path.write_text("0123456789abcdef-long-enough\n")
    assert load_settings(admin_token_file=path).admin_token_file == path


def test_one_admin_token_source_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("0123456789abcdef-long-enough")
    monkeypatch.setenv("TCPPROXY_ADMIN_TOKEN", "0123456789abcdef-long-enough")

    with pytest.raises(SettingsError, match=r"^set the admin token once"):
        load_settings(admin_token_file=path)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("admin_read_timeout", "0"),
        ("admin_read_timeout", "soon"),
        ("admin_max_connections", 0),
        ("admin_max_connections", "many"),
    ],
)
def test_bad_admin_limits(flag: str, value: object) -> None:
    option = "--" + flag.replace("_", "-")

    with pytest.raises(SettingsError, match=f"^{option}: "):
        load_settings(**{flag: value})


def test_admin_limits_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPPROXY_ADMIN_READ_TIMEOUT", "250ms")
    monkeypatch.setenv("TCPPROXY_ADMIN_MAX_CONNECTIONS", "8")

    settings = load_settings()

    assert (settings.admin_read_timeout, settings.admin_max_connections) == (0.25, 8)


def test_origin_names_what_the_user_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages name the flag or the variable that was set, or neither for a default."""
    monkeypatch.setenv("TCPPROXY_LOG_LEVEL", "debug")
    settings = load_settings(admin="127.0.0.1:9999")
    assert settings.origin("admin") == "--admin"
    assert settings.origin("log_level") == "TCPPROXY_LOG_LEVEL"
    assert settings.origin("config") is None
    assert settings.origin("poll_interval") is None


def test_a_missing_default_config_says_it_is_the_relative_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    problems = ["config/tcpproxy.yaml: file not found", "other: problem"]
    (hinted, other) = load_settings().hint_missing_config(problems)
    assert hinted.startswith("config/tcpproxy.yaml: file not found (the default config path")
    assert str(tmp_path) in hinted
    assert "--config" in hinted
    assert other == "other: problem"
    # Chosen by the user: their path, their problem, as it was.
    assert load_settings(config=Path("config/tcpproxy.yaml")).hint_missing_config(problems) == (
        problems
    )


def test_a_negative_poll_interval_says_it_must_not_be_negative() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(poll_interval="-1")
    assert str(info.value) == "--poll-interval: invalid duration '-1': must be a finite value >= 0"
