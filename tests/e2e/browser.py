"""Headless Chromium for tests: the status page as a browser renders it, and pages that try
to drive the admin API from another origin."""

from __future__ import annotations

import base64
import itertools
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.processes import REPO
from tests.harness import LoopThread, wait_until

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


class Browser:
    """One headless Chromium for a whole test, driven over the DevTools protocol with
    aiohttp's websocket client: load a page, wait for what it shows, read its DOM, take
    screenshots. One browser start however many pages and pictures."""

    def __init__(self, profile: Path) -> None:
        self.thread = LoopThread()
        self.proc = subprocess.Popen(
            chromium_command(profile, "--remote-debugging-port=0", "about:blank"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)
        try:
            # Chromium writes the port it took into the profile once it listens.
            active = profile / "DevToolsActivePort"
            wait_until(
                lambda: len(active.read_text().split()) >= 2 if active.exists() else False,
                timeout=CHROMIUM_TIMEOUT_S,
                what="Chromium's DevTools port",
            )
            port = int(active.read_text().split()[0])
            self.session, self.ws = self.thread.run(self._connect(port), CHROMIUM_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    async def _connect(
        self, port: int
    ) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
        session = aiohttp.ClientSession()
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        [page] = [t for t in targets if t["type"] == "page"]
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return session, ws

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command and its result (no events are enabled: every message is an
        answer)."""
        call_id = next(self._ids)

        async def call() -> dict[str, Any]:
            await self.ws.send_json({"id": call_id, "method": method, "params": params})
            while True:
                message: dict[str, Any] = await self.ws.receive_json()
                if message.get("id") == call_id:
                    return message

        answer = self.thread.run(call(), CHROMIUM_TIMEOUT_S)
        assert "error" not in answer, (method, answer["error"])
        result: dict[str, Any] = answer["result"]
        return result

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> None:
        wait_until(lambda: bool(self.evaluate(expression)), CHROMIUM_TIMEOUT_S, what)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
            f"{url} loaded",
        )

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> None:
        """The whole page, however long, at the window's width."""
        height = self.send("Page.getLayoutMetrics")["cssContentSize"]["height"]
        clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": math.ceil(height), "scale": 1}
        shot = self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        if hasattr(self, "ws"):
            self.thread.run(self.ws.close())
            self.thread.run(self.session.close())
        self.proc.terminate()
        try:
            self.proc.wait(CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.stop()
