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
