"""The CLI's refusal on a platform without epoll (the proxy's data path needs it)."""

from __future__ import annotations

import select

import pytest

from tcpproxy import cli


@pytest.mark.parametrize("command", [["run"], ["demo"]])
def test_without_epoll_run_and_demo_exit_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    monkeypatch.delattr(select, "epoll")
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs Linux (epoll)" in err


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_lists_the_admin_settings(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, env in [
        ("--admin-token-file", "TCPPROXY_ADMIN_TOKEN_FILE"),
        ("--admin-allowed-hosts", "TCPPROXY_ADMIN_ALLOWED_HOSTS"),
        ("--admin-read-timeout", "TCPPROXY_ADMIN_READ_TIMEOUT"),
        ("--admin-max-connections", "TCPPROXY_ADMIN_MAX_CONNECTIONS"),
    ]:
        assert flag in out
        assert env in out
    assert "TCPPROXY_ADMIN_TOKEN." in out or "TCPPROXY_ADMIN_TOKEN " in out


def test_rollout_help_has_the_token_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["rollout", "--help"])
    assert "--admin-token-file" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("admin", "url"),
    [
        ("127.0.0.1:9901", "http://127.0.0.1:9901"),
        ("0.0.0.0:9901", "http://127.0.0.1:9901"),
        ("[::]:9901", "http://[::1]:9901"),
        ("[::1]:9901", "http://[::1]:9901"),
        ("tcpproxy-admin:9901", "http://tcpproxy-admin:9901"),
    ],
)
def test_rollout_reaches_a_wildcard_admin_address_on_loopback(admin: str, url: str) -> None:
    from tcpproxy.rollout_cli import admin_url  # noqa: PLC0415

    assert admin_url(admin) == url
