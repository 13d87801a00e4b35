"""Who may change state through the admin API, over real HTTP: the token, the Host and
Origin rules, the content types, and control off on a non-loopback address with no token.

Each refused request is checked to have changed nothing: the rollout keeps its state and the
config on disk (changed, so that a reload would show) is not applied.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tcpproxy.admin import AdminOptions
from tests.harness import Backends, RunningProxy, config_yaml, free_port, listener_yaml
from tests.integration import admin_http
from tests.integration.admin_http import Admin, StartAdmin

Start = Callable[[str], RunningProxy]
admins = pytest.fixture(admin_http.admins)
TOKEN = "s3cret-token-for-tests-0123456789"


def rollout_config(port: int, v1: str, v2: str, weight: int = 1) -> str:
    """Listener `app`: v1 and v2 and an hour-long rollout from v1 to v2 (it stays running
    unless someone pauses or aborts it). `weight`: v1's weight, to tell configs apart."""
    text = listener_yaml("app", port, {"v1": (v1, weight), "v2": (v2, 0)})
    block = "from: v1\nto: v2\nsteps: [10, 50]\nstep_duration: 1h\n"
    return config_yaml(
        text + "    rollout:\n" + "".join(f"      {line}\n" for line in block.splitlines())
    )


class Setup:
    """A proxy with a running rollout, and a changed config file that no reload applied."""

    def __init__(self, backends: Backends, start_proxy: Start) -> None:
        v1, v2 = backends.start("v1"), backends.start("v2")
        port = free_port()
        self.running = start_proxy(rollout_config(port, v1, v2))
        self.applied = self.running.state(lambda p: p.applied.sha256 if p.applied else None)
        self.running.write_config(rollout_config(port, v1, v2, weight=2))

    def rollout_state(self, admin: Admin) -> str:
        state: str = admin.status()["listeners"][0]["rollout"]["state"]
        return state

    def assert_unchanged(self, admin: Admin) -> None:
        assert self.rollout_state(admin) == "running"
        assert admin.status()["sha256"] == self.applied, "the config was reloaded"


@pytest.fixture
def setup(backends: Backends, start_proxy: Start) -> Setup:
    return Setup(backends, start_proxy)


CONTROL = ["/-/reload", "/rollout/app/abort", "/rollout/app/pause"]


@pytest.mark.parametrize("path", CONTROL)
def test_with_a_token_set_control_needs_it(setup: Setup, admins: StartAdmin, path: str) -> None:
    admin = admins(setup.running.proxy, AdminOptions(token=TOKEN))
    missing = admin.post(path, token=False)
    assert missing.status == 401
    assert "admin token" in missing.json()["error"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = admin.post(path, headers={"Authorization": f"Bearer {TOKEN}x"}, token=False)
    assert wrong.status == 401
    basic = admin.post(path, headers={"Authorization": f"Basic {TOKEN}"}, token=False)
    assert basic.status == 401
    setup.assert_unchanged(admin)
    # Read-only endpoints need no token.
    for read in ("/livez", "/readyz", "/status", "/metrics", "/"):
        assert admin.get(read).status == 200, read

    assert admin.post(path).status == 200  # with the token
    if path == "/-/reload":
        assert admin.status()["sha256"] != setup.applied
    else:
        assert setup.rollout_state(admin) == {"abort": "aborted", "pause": "paused"}[path[-5:]]


def test_a_token_file_is_read_again_for_each_request(
    setup: Setup, admins: StartAdmin, tmp_path: Path
) -> None:
    """A rotated Kubernetes Secret applies without a restart; an unusable file refuses all."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # `kubectl create secret --from-file` keeps newlines
    admin = admins(setup.running.proxy, AdminOptions(token_file=token_file))
    assert admin.post("/rollout/app/pause").status == 200
    token_file.write_text("rotated-token-abcdefghijklmnop")
    assert admin.post("/rollout/app/resume").status == 401  # the old one
    rotated = {"Authorization": "Bearer rotated-token-abcdefghijklmnop"}
    assert admin.post("/rollout/app/resume", headers=rotated, token=False).status == 200
    token_file.unlink()
    gone = admin.post("/rollout/app/pause", headers=rotated, token=False)
    assert gone.status == 503
    assert "cannot read" in gone.json()["error"]
    assert setup.rollout_state(admin) == "running"


def test_without_a_token_control_answers_on_a_loopback_address_only(
    setup: Setup, admins: StartAdmin
) -> None:
    everywhere = admins(setup.running.proxy, host="0.0.0.0")
    for path in CONTROL:
        refused = everywhere.post(path)
        assert refused.status == 403
        error = refused.json()["error"]
        assert "--admin-token-file" in error
        assert "TCPPROXY_ADMIN_TOKEN" in error
    setup.assert_unchanged(everywhere)
    assert everywhere.get("/status").status == 200
    assert everywhere.get("/livez").status == 200
    # The demo and a laptop: a loopback admin address and no token.
    local = admins(setup.running.proxy)
    assert local.post("/rollout/app/pause").status == 200
    assert setup.rollout_state(local) == "paused"


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.2:8000",  # another loopback origin
        "http://127.0.0.1:1",  # the same host, another port (same site, not same origin)
        "http://evil.example",
        "null",  # a sandboxed frame, a file:// page, a redirect
    ],
)
def test_a_foreign_origin_is_refused(setup: Setup, admins: StartAdmin, origin: str) -> None:
    admin = admins(setup.running.proxy)
    for path in CONTROL:
        refused = admin.post(path, headers={"Origin": origin})
        assert refused.status == 403, path
        assert "cross-site" in refused.json()["error"]
    setup.assert_unchanged(admin)
    # The admin server's own origin may (a page it serves could have a button).
    own = {"Origin": admin.url, "Sec-Fetch-Site": "same-origin"}
    assert admin.post("/rollout/app/pause", headers=own).status == 200


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_cross_site_fetch_without_origin_is_refused(
    setup: Setup, admins: StartAdmin, site: str
) -> None:
    admin = admins(setup.running.proxy)
    assert admin.post("/rollout/app/abort", headers={"Sec-Fetch-Site": site}).status == 403
    setup.assert_unchanged(admin)


def test_a_host_outside_the_allow_list_is_refused(setup: Setup, admins: StartAdmin) -> None:
    """DNS rebinding: a browser sends the attacker's name as Host."""
    admin = admins(setup.running.proxy)
    for host in ("evil.example", f"evil.example:{admin.port}", f"10.1.2.3:{admin.port}", ""):
        for path in CONTROL:
            refused = admin.post(path, headers={"Host": host})
            assert refused.status == 403, (host, path)
            assert "is not this admin server" in refused.json()["error"]
        # Read-only endpoints answer whatever the Host: the kubelet sends the pod's IP.
        assert admin.request("/status", headers={"Host": host}).status == 200
    setup.assert_unchanged(admin)
    for host in ("localhost", "127.0.0.1", "127.0.0.5", "[::1]", "LOCALHOST"):
        for action in ("pause", "resume"):
            allowed = admin.post(f"/rollout/app/{action}", headers={"Host": f"{host}:1"})
            assert allowed.status == 200, host


def test_allowed_hosts_extend_the_list(setup: Setup, admins: StartAdmin) -> None:
    admin = admins(setup.running.proxy, AdminOptions(allowed_hosts=("tcpproxy-admin.prod.svc",)))
    named = {"Host": f"tcpproxy-admin.prod.svc:{admin.port}"}
    assert admin.post("/rollout/app/abort", headers={"Host": "other.svc"}).status == 403
    assert admin.post("/rollout/app/pause", headers=named).status == 200
    anything = admins(setup.running.proxy, AdminOptions(allowed_hosts=("*",)))
    assert anything.post("/rollout/app/resume", headers={"Host": "x.example"}).status == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b"x=1"),  # <form enctype="text/plain">, fetch(url, {body: "..."})
        ("text/plain;charset=UTF-8", b""),
        ("application/x-www-form-urlencoded", b"a=b"),  # a plain <form>
        ("application/x-www-form-urlencoded", b""),  # a form with no fields
        ("multipart/form-data; boundary=x", b"--x--\r\n"),
        (None, b"{}"),  # a body must say it is JSON
    ],
)
def test_only_no_body_or_json_is_accepted(
    setup: Setup, admins: StartAdmin, content_type: str | None, body: bytes
) -> None:
    admin = admins(setup.running.proxy)
    headers = {"Content-Type": content_type} if content_type else {}
    for path in CONTROL:
        refused = admin.post(path, headers=headers, body=body)
        assert refused.status == 415, path
    setup.assert_unchanged(admin)


def test_json_bodies(setup: Setup, admins: StartAdmin) -> None:
    admin = admins(setup.running.proxy)
    json_type = {"Content-Type": "application/json"}
    assert admin.post("/rollout/app/pause", headers=json_type, body=b"not json").status == 400
    big = b'{"x": "' + b"a" * 10_000 + b'"}'
    assert admin.post("/rollout/app/pause", headers=json_type, body=big).status == 413
    assert setup.rollout_state(admin) == "running"
    assert admin.post("/rollout/app/pause", headers=json_type, body=b"{}").status == 200
    assert admin.post("/rollout/app/resume", headers=json_type).status == 200  # no body
    # aiohttp's client says application/octet-stream even when it posts nothing.
    octets = {"Content-Type": "application/octet-stream"}
    assert admin.post("/rollout/app/pause", headers=octets).status == 200
    assert admin.post("/rollout/app/resume", headers=octets, body=b"{}").status == 415


def test_only_post_changes_state(setup: Setup, admins: StartAdmin) -> None:
    admin = admins(setup.running.proxy)
    for method in ("GET", "HEAD"):
        assert admin.request("/-/reload", method=method).status == 405
    for method in ("PUT", "DELETE", "PATCH"):
        assert admin.request("/rollout/app/abort", method=method).status == 405
    # A CORS preflight is refused like the request it asks for, and grants nothing.
    preflight = admin.request(
        "/rollout/app/abort",
        method="OPTIONS",
        headers={"Origin": "http://127.0.0.2:8000", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers
    setup.assert_unchanged(admin)


def test_the_log_names_the_client(
    setup: Setup, admins: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    admin = admins(setup.running.proxy, AdminOptions(token=TOKEN))
    with caplog.at_level(logging.INFO, logger="tcpproxy"):
        assert (
            admin.post("/rollout/app/abort", headers={"Origin": "http://x.example"}).status == 403
        )
        assert admin.post("/rollout/app/abort").status == 200
        assert admin.post("/-/reload").status == 200
    lines = [r.getMessage() for r in caplog.records]
    [refused] = [line for line in lines if "refused POST /rollout/app/abort" in line]
    assert "from 127.0.0.1:" in refused
    assert "Origin http://x.example" in refused
    [aborted] = [line for line in lines if "rollout aborted on this replica by an admin" in line]
    assert aborted.startswith(
        "app: rollout aborted on this replica by an admin API request from 127.0.0.1:"
    )
    assert aborted.endswith(" with the admin token")
    [reload] = [line for line in lines if "reload asked for by" in line]
    assert "an admin API request from 127.0.0.1:" in reload


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TCPPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "tcpproxy", "rollout", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**clean, **(env or {})},
    )


def test_the_rollout_cli_sends_the_token(setup: Setup, admins: StartAdmin, tmp_path: Path) -> None:
    admin = admins(setup.running.proxy, AdminOptions(token=TOKEN), host="0.0.0.0")
    # The container's TCPPROXY_ADMIN=0.0.0.0:9901: the CLI reaches it on loopback.
    where = ["--admin", admin.address]
    assert admin.address.startswith("0.0.0.0:")

    refused = cli("pause", *where)
    assert refused.returncode == 2
    assert "pause refused: missing or wrong admin token" in refused.stderr
    assert setup.rollout_state(admin) == "running"

    paused = cli("pause", *where, env={"TCPPROXY_ADMIN_TOKEN": TOKEN})
    assert paused.returncode == 0, paused.stderr
    assert "paused" in paused.stdout
    assert setup.rollout_state(admin) == "paused"

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    resumed = cli("resume", *where, "--admin-token-file", str(token_file))
    assert resumed.returncode == 0, resumed.stderr
    assert setup.rollout_state(admin) == "running"
    by_env = cli("abort", *where, env={"TCPPROXY_ADMIN_TOKEN_FILE": str(token_file)})
    assert by_env.returncode == 0, by_env.stderr
    assert setup.rollout_state(admin) == "aborted"
    assert cli("status", *where).returncode == 0  # reading needs no token
