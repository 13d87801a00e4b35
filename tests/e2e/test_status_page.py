"""The status page in a real headless Chromium, served by `tcpproxy run` as users start it."""

from __future__ import annotations

import hashlib
import json
import signal
import struct
from html.parser import HTMLParser
from pathlib import Path

from tests.e2e.browser import ARTIFACTS, WINDOW, chromium
from tests.e2e.processes import START_S, Process, http
from tests.harness import Client, clients, config_yaml, free_port, listener_yaml, wait_until


class Page(HTMLParser):
    """The rendered DOM: the backend tables' rows as cell texts, and <body>'s attributes."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.body: dict[str, str | None] = {}
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_tbody = False
        self._in_backends = False
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.body = dict(attrs)
        elif tag == "table":
            self._in_backends = "backends" in (dict(attrs).get("class") or "").split()
        elif tag == "tbody" and self._in_backends:
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def backend(self, name: str) -> list[str]:
        [row] = [r for r in self.rows if r[0] == name]
        return row


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_status_page_in_headless_chromium(tmp_path: Path, echo_backends: dict[str, str]) -> None:
    port, admin = free_port(), free_port()
    base = f"http://127.0.0.1:{admin}"
    path = tmp_path / "routes" / "tcpproxy.yaml"
    path.parent.mkdir()
    v1, v2 = echo_backends["v1"], echo_backends["v2"]

    def routes(with_old: bool) -> str:
        backends = {"v1": (v1, 3), "v2": (v2, 1), "canary": (v2, 0)}
        if with_old:
            backends["old"] = (v1, 1)
        return config_yaml(listener_yaml("shop", port, backends, drain_timeout="300s"))

    path.write_text(routes(with_old=True))
    proc = Process(
        "run",
        "--config", str(path),
        "--admin", f"127.0.0.1:{admin}",
        "--no-watch",
        "--poll-interval", "0",
        "--shutdown-timeout", "5s",
        "--log-format", "json",
    )  # fmt: skip
    try:
        wait_until(lambda: http(f"{base}/readyz")[0] == 200, timeout=START_S, what="ready")
        # 5 connections by weights 3/1/0/1: v1 3, v2 1, old 1. Then `old` is removed and
        # drains with its connection open.
        with clients(port, 5) as held:
            assert sorted(c.greeting() for c in held) == ["v1", "v1", "v1", "v1", "v2"]
            path.write_text(routes(with_old=False))
            assert http(f"{base}/-/reload", method="POST")[0] == 200
            status = json.loads(http(f"{base}/status")[1])
            assert status["listeners"][0]["backends"][3]["state"] == "draining"

            # The page as a browser renders it, after its script has refreshed it from the
            # server at least once (virtual time runs the timers without waiting).
            dom = chromium(
                tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", base + "/"
            )
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "status_page.html").write_text(dom)
            screenshot = ARTIFACTS / "status_page.png"
            screenshot.unlink(missing_ok=True)
            chromium(tmp_path / "profile-shot", f"--screenshot={screenshot}", base + "/")
        page = Page(dom)
        assert int(page.body["data-refreshes"] or 0) >= 1, "the page never refreshed itself"
        assert "is-stale" not in (page.body.get("class") or "")
        text = " ".join("".join(page.text).split())
        assert "shop" in text
        assert f"127.0.0.1:{port}" in text
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:12] in text
        assert "success" in text  # the last reload's result
        # backend, address, weight, effective weight, share, state, active, total, ...
        assert page.backend("v1")[1:8] == [v1, "3", "3", "75%", "active", "3", "3"]
        assert page.backend("v2")[1:8] == [v2, "1", "1", "25%", "active", "1", "1"]
        assert page.backend("canary")[1:8] == [v2, "0", "0", "0%", "zero", "0", "0"]
        old = page.backend("old")
        assert old[3:5] == ["-", "0%"]
        assert old[5].startswith("draining ")
        assert old[5].endswith(" left")
        assert old[6:8] == ["1", "1"]
        assert png_size(screenshot) == WINDOW

        proc.signal(signal.SIGTERM)
        code, _, err = proc.wait()
        assert code == 0, err
    finally:
        proc.kill()


def test_status_page_says_when_the_server_is_gone(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    """Saved to a file, the page cannot fetch itself: it must say its figures are stale."""
    port, admin = free_port(), free_port()
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("shop", port, {"v1": (echo_backends["v1"], 1)})))
    proc = Process("run", "--config", str(path), "--admin", f"127.0.0.1:{admin}", "--no-watch")
    try:
        wait_until(
            lambda: http(f"http://127.0.0.1:{admin}/readyz")[0] == 200,
            timeout=START_S,
            what="ready",
        )
        c = Client(port)
        assert c.greeting() == "v1"
        c.close()
        status, html = http(f"http://127.0.0.1:{admin}/")
        assert status == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait()[0] == 0
    finally:
        proc.kill()
    saved = tmp_path / "status.html"
    saved.write_text(html)
    dom = chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", saved.as_uri())
    page = Page(dom)
    assert "is-stale" in (page.body.get("class") or "")
    assert page.backend("v1")[1:4] == [
        echo_backends["v1"],
        "1",
        "1",
    ]  # the last figures stay visible
