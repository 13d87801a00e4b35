"""The scripts in scripts/, run as a user runs them, on stand-ins for the tools they call."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.e2e.processes import REPO

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >>"{log}"
case "$*" in *"pip install"*) cp "$0.tcpproxy" "$(dirname "$0")/tcpproxy" ;; esac
"""


def test_demo_installs_only_when_pyproject_changed(tmp_path: Path) -> None:
    """./scripts/demo runs pip once, then starts at once until pyproject.toml changes (the
    package is editable: code changes need no install)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "demo", checkout / "scripts" / "demo")
    shutil.copy2(REPO / "pyproject.toml", checkout / "pyproject.toml")
    log = tmp_path / "calls"
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # The venv's python records its calls; "installing" puts a tcpproxy beside it.
    (bin_dir / "python").write_text(STUB.format(log=log))
    (bin_dir / "python.tcpproxy").write_text(f'#!/bin/sh\necho "tcpproxy $*" >>"{log}"\n')
    for stub in ("python", "python.tcpproxy"):
        (bin_dir / stub).chmod(0o755)

    def demo() -> list[str]:
        log.write_text("")
        subprocess.run([checkout / "scripts" / "demo", "--log-level", "debug"], check=True)
        return log.read_text().splitlines()

    install = "python -m pip install -q -e ."
    run = "tcpproxy demo --log-level debug"
    assert demo() == [install, run]
    assert demo() == [run]
    with (checkout / "pyproject.toml").open("a") as f:
        f.write("# a new dependency\n")
    assert demo() == [install, run]
    assert demo() == [run]
