"""Build the image from the Dockerfile and proxy a real connection through it.

The build runs in podman with `--isolation chroot` (no daemon, no nested namespaces) on a
base image made here with debootstrap (see baseimage.py), passed through the Dockerfile's
PYTHON_IMAGE build argument as a user would pass a mirrored python:3.x-slim. The containers
run under runc, read-only with no tmpfs added, with every capability dropped, as the
manifests run them. They share the host's network namespace so every byte stays on loopback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .baseimage import ensure_base_image
from .tools import DOCKERFILE, REPO_ROOT, find_tool, run

IMAGE = "localhost/tcpproxy:ci"
CONFIG_DIR = "/etc/tcpproxy"
START_TIMEOUT_SECONDS = 60.0
RELOAD_TIMEOUT_SECONDS = 30.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def podman() -> str:
    return find_tool("podman")


def _image_id(name: str) -> str | None:
    proc = subprocess.run(
        [podman(), "image", "inspect", "--format", "{{.Id}}", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def image() -> str:
    base = ensure_base_image()
    previous = _image_id(IMAGE)
    run(
        [
            podman(),
            "build",
            "--isolation",
            "chroot",
            # Docker format: OCI image config has no HEALTHCHECK or STOPSIGNAL semantics.
            "--format",
            "docker",
            "--pull=never",
            "--layers",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--tag",
            IMAGE,
            "--file",
            str(DOCKERFILE),
            str(REPO_ROOT),
        ],
        timeout=900,
    )
    current = _image_id(IMAGE)
    if previous is not None and previous != current:
        # The old build lost its tag; drop it so repeated runs do not fill the disk.
        subprocess.run([podman(), "rmi", previous], capture_output=True, check=False, timeout=60)
    return IMAGE


def _run_flags() -> list[str]:
    # This sandbox forbids raising resource limits (no CAP_SYS_RESOURCE) and podman's defaults
    # ask for more than the current hard limits, so ask for exactly what we have.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 4096)
    return [
        "--runtime",
        "runc",
        "--read-only",
        # No writable /tmp, /var/tmp or /run either: the image must need none.
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "host",
        "--ulimit",
        f"nofile={nofile}:{nofile}",
        "--ulimit",
        f"nproc={nproc}:{nproc}",
        # Health checks are run on demand below (no systemd here to schedule them).
        "--health-interval",
        "disable",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Containers:
    """Start containers and remove every one of them (and only them) at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def start(self, *args: str) -> str:
        name = f"tcpproxy-ci-{uuid.uuid4().hex[:12]}"
        run([podman(), "run", "--detach", "--name", name, *_run_flags(), *args], timeout=120)
        self.names.append(name)
        return name

    def logs(self, name: str) -> str:
        proc = run([podman(), "logs", name], check=False, timeout=60)
        return proc.stdout + proc.stderr

    def state(self, name: str) -> dict[str, Any]:
        out = run([podman(), "inspect", "--format", "{{json .State}}", name], timeout=60).stdout
        state: dict[str, Any] = json.loads(out)
        return state

    def remove_all(self) -> None:
        for name in self.names:
            subprocess.run(
                [podman(), "rm", "--force", "--time", "0", name],
                capture_output=True,
                check=False,
                timeout=60,
            )


@pytest.fixture
def containers() -> Iterator[Containers]:
    started = Containers()
    try:
        yield started
    finally:
        started.remove_all()


def wait_for(
    what: str,
    probe: Callable[[], bool],
    containers: Containers,
    names: list[str],
    timeout: float,
) -> None:
    """Poll `probe` until it is true; fail early, with logs, if a container exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        for name in names:
            if not containers.state(name)["Running"]:
                pytest.fail(
                    f"container {name} exited while waiting for {what}:\n{containers.logs(name)}"
                )
        time.sleep(0.2)
    logs = "\n".join(f"--- {n} ---\n{containers.logs(n)}" for n in names)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def connect(port: int) -> Iterator[io.BufferedRWPair]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        sock.makefile("rwb") as stream,
    ):
        yield stream


def exchange(stream: io.BufferedRWPair, line: bytes) -> bytes:
    stream.write(line)
    stream.flush()
    return stream.readline()


def write_config(directory: Path, text: str) -> None:
    """Replace the config the way editors and the kubelet do: write aside, rename over."""
    staging = directory / ".tcpproxy.yaml.tmp"
    staging.write_text(text)
    staging.chmod(0o644)
    os.replace(staging, directory / "tcpproxy.yaml")


def route_config(proxy_port: int, backends: dict[str, tuple[int, int]]) -> str:
    lines = [
        "listeners:",
        "  - name: ci",
        f'    bind: "127.0.0.1:{proxy_port}"',
        "    drain_timeout: 30s",
        "    connect_timeout: 2s",
        "    backends:",
    ]
    for name, (port, weight) in backends.items():
        lines += [
            f"      - name: {name}",
            f'        address: "127.0.0.1:{port}"',
            f"        weight: {weight}",
        ]
    return "\n".join(lines) + "\n"


def test_image_metadata(image: str) -> None:
    out = run([podman(), "image", "inspect", image]).stdout
    (info,) = json.loads(out)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tcpproxy"]
    assert config["Cmd"] == ["run", "--config", f"{CONFIG_DIR}/tcpproxy.yaml"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) == {"8008/tcp", "9901/tcp"}
    assert "TCPPROXY_ADMIN=0.0.0.0:9901" in config["Env"]
    assert "/livez" in " ".join(info["Healthcheck"]["Test"])


def test_version_runs_as_non_root_on_read_only_root(image: str) -> None:
    proc = run([podman(), "run", "--rm", *_run_flags(), image, "--version"], timeout=120)
    assert proc.stdout.strip().startswith("tcpproxy ")
    ident = run(
        [
            podman(),
            "run",
            "--rm",
            *_run_flags(),
            "--entrypoint",
            "python",
            image,
            "-c",
            "import os, uvloop; print(os.getuid(), os.getgid()); open('/probe', 'w')",
        ],
        check=False,
        timeout=120,
    )
    assert ident.stdout.split() == ["10001", "10001"]
    assert "Read-only file system" in ident.stderr


def test_proxies_and_hot_reloads_through_the_container(
    image: str, containers: Containers, tmp_path: Path
) -> None:
    v1_port, v2_port, proxy_port, admin_port = (free_port() for _ in range(4))
    v1 = containers.start(image, "echo", "--listen", f"127.0.0.1:{v1_port}", "--name", "v1")
    v2 = containers.start(image, "echo", "--listen", f"127.0.0.1:{v2_port}", "--name", "v2")
    wait_for(
        "the echo backends",
        lambda: accepts(v1_port) and accepts(v2_port),
        containers,
        [v1, v2],
        START_TIMEOUT_SECONDS,
    )

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config_dir.chmod(0o755)  # the container runs as uid 10001
    write_config(config_dir, route_config(proxy_port, {"v1": (v1_port, 1), "v2": (v2_port, 0)}))
    # The default command, with the config directory mounted where it expects it.
    proxy = containers.start(
        "--volume",
        f"{config_dir}:{CONFIG_DIR}:ro",
        "--env",
        f"TCPPROXY_ADMIN=127.0.0.1:{admin_port}",
        "--env",
        "TCPPROXY_SHUTDOWN_TIMEOUT=5s",
        image,
    )
    admin = f"http://127.0.0.1:{admin_port}"
    wait_for(
        "/readyz", lambda: http_ok(f"{admin}/readyz"), containers, [proxy], START_TIMEOUT_SECONDS
    )
    health = run([podman(), "healthcheck", "run", proxy], check=False, timeout=60)
    assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"
    # And it does look: an echo backend runs no admin server, so the same check fails there.
    assert run([podman(), "healthcheck", "run", v1], check=False, timeout=60).returncode != 0

    with connect(proxy_port) as old:
        assert old.readline() == b"hello from v1\n"
        assert exchange(old, b"ping through the container\n") == b"ping through the container\n"

        # Shift all new connections to v2 by rewriting the mounted directory's file.
        write_config(config_dir, route_config(proxy_port, {"v1": (v1_port, 0), "v2": (v2_port, 1)}))

        def new_connection_reaches_v2() -> bool:
            with connect(proxy_port) as new:
                return bool(new.readline() == b"hello from v2\n")

        wait_for(
            "new connections to reach v2",
            new_connection_reaches_v2,
            containers,
            [proxy],
            RELOAD_TIMEOUT_SECONDS,
        )
        # The connection opened before the reload is still pinned to v1 and still works.
        assert exchange(old, b"still here\n") == b"still here\n"

    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "tcpproxy_connections_total" in metrics

    # `podman stop` sends the image's STOPSIGNAL; tcpproxy shuts down cleanly with exit 0.
    run([podman(), "stop", "--time", "20", proxy], timeout=60)
    state = containers.state(proxy)
    assert state["ExitCode"] == 0, containers.logs(proxy)
