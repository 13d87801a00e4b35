"""Headless Chromium for e2e tests: the status page as a browser renders it, and pages that
try to drive the admin API from another origin."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.e2e.processes import REPO

# Where a person can look at what the test saw (gitignored).
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_TIMEOUT_S = 60
WINDOW = (1280, 900)


def chromium_command(profile: Path, *args: str) -> list[str]:
    """The command line of a headless Chromium with a profile of its own."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is missing: ./scripts/test installs it (Debian package chromium)"
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
        *args,
    ]


def chromium(profile: Path, *args: str) -> str:
    """Run headless Chromium once (dump the DOM, take a screenshot); return its stdout."""
    result = subprocess.run(
        chromium_command(profile, *args),
        check=False,
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
