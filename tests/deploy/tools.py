"""Locating and running the command-line tools the deploy tests need.

CI installs every tool with scripts/test (apt) and the dev extras (pip), so a missing one
is a failure with the fix in its message, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
K8S_DIR = DEPLOY_DIR / "k8s"
COMPOSE_DIR = DEPLOY_DIR / "compose"
DOCKERFILE = REPO_ROOT / "Dockerfile"

INSTALL_HINT = "run `./scripts/test` (as root) to install it"


def find_tool(name: str) -> str:
    """Return the path of `name`, preferring the one installed beside this interpreter.

    pip puts console scripts (hadolint, kubectl, docker-compose, kubernetes-validate) next
    to the running Python, which need not be on PATH when a venv is not activated.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` was not found beside {sys.executable} nor on PATH; {INSTALL_HINT}")
    return found


def run(
    args: list[str],
    *,
    cwd: Path | None = None,
    timeout: float = 120,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure, fail with everything it printed."""
    proc = subprocess.run(
        args,
        cwd=cwd,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"command failed with exit code {proc.returncode}: {' '.join(args)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """Seconds in a duration as DESIGN §1 writes them: `30`, `0.5`, `250ms`, `30s`, `5m`, `1h`."""
    if isinstance(text, int | float):
        return float(text)
    value = text.strip()
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * _DURATION_UNITS[unit]
    return float(value)


def check_route_config(text: str, tmp_dir: Path) -> None:
    """Fail unless `tcpproxy check` (the contract's validator) accepts this route config."""
    path = tmp_dir / "tcpproxy.yaml"
    path.write_text(text)
    proc = run([sys.executable, "-m", "tcpproxy", "check", "--config", str(path)], check=False)
    assert proc.returncode == 0, (
        f"`tcpproxy check` rejected the route config (exit {proc.returncode}):\n"
        f"{proc.stdout}{proc.stderr}\n--- config ---\n{text}"
    )
