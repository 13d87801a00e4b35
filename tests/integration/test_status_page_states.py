"""The status page in one real headless Chromium session through four states of a proxy
(steady, a rollout, a drain, a rejected reload), with a screenshot of each in
tests/artifacts/ for a person to look at.

The proxy runs on its loop thread here, with its share history sampled every quarter of a
second instead of every 5 s, so that a chart with columns, a gap, steps and reloads takes
seconds of traffic rather than minutes. Every wait is for something the proxy reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tcpproxy import pool
from tests.e2e.browser import ARTIFACTS, Browser
from tests.harness import (
    Backends,
    RunningProxy,
    clients,
    config_yaml,
    free_port,
    greetings,
    listener_yaml,
    wait_until,
)
from tests.integration import admin_http
from tests.integration.admin_http import Admin, StartAdmin

Start = Callable[[str], RunningProxy]
admins = pytest.fixture(admin_http.admins)
ROLLOUT = (
    "    rollout:\n      from: v1\n      to: v2\n      steps: [25, 75]\n      step_duration: 1s\n"
)


def routes(port: int, addresses: dict[str, str], *, old: bool, rollout: bool) -> str:
    backends = {"v1": (addresses["v1"], 3), "v2": (addresses["v2"], 1)}
    if old:
        backends["old"] = (addresses["old"], 1)
    text = listener_yaml("shop", port, backends, drain_timeout="300s")
    return config_yaml(text + (ROLLOUT if rollout else ""))


def shop(admin: Admin) -> Any:
    [listener] = admin.status()["listeners"]
    return listener


def history_has(listener: Any, pattern: str) -> bool:
    """The finished intervals of the share history, 1 with new connections and 0 without,
    match `pattern`."""
    busy = "".join("1" if h["connections"] else "0" for h in listener["history"][:-1])
    return re.search(pattern, busy) is not None


def svg_texts(browser: Browser, selector: str) -> list[str]:
    return list(
        browser.evaluate(
            f"Array.from(document.querySelectorAll({selector!r})).map(e => e.textContent)"
        )
    )


def backend_cells(browser: Browser) -> dict[str, list[str]]:
    """The backends table: name -> its cells' texts."""
    rows = browser.evaluate(
        "Array.from(document.querySelectorAll('table.backends tbody tr')).map("
        "r => Array.from(r.cells).map(c => c.textContent.trim()))"
    )
    return {row[0]: row for row in rows}


def look(browser: Browser, admin: Admin, name: str) -> None:
    """Load the page afresh and keep a picture of it."""
    browser.goto(admin.url + "/")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / f"status_{name}.png")


def test_status_page_through_a_rollout_a_drain_and_a_bad_reload(
    backends: Backends,
    start_proxy: Start,
    admins: StartAdmin,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(pool, "HISTORY_INTERVAL_S", 0.25)
    addresses = {name: backends.start(name) for name in ("v1", "v2", "old")}
    port = free_port()
    running = start_proxy(routes(port, addresses, old=True, rollout=False))
    admin = admins(running.proxy)
    browser = Browser(tmp_path / "profile")
    try:
        # Steady: two bursts of traffic with a pause between them.
        greetings(port, 10)
        # Any number of idle intervals since: "10$" held for one interval only, which a
        # slow machine's status requests could miss.
        wait_until(lambda: history_has(shop(admin), "10+$"), what="an idle interval")
        greetings(port, 10)
        wait_until(lambda: history_has(shop(admin), "10+1"), what="a gap in the share history")
        look(browser, admin, "steady")
        columns = browser.evaluate("document.querySelectorAll('.chart svg g > rect').length")
        assert columns >= 2
        assert svg_texts(browser, ".chart svg > text")[:5] == ["0%", "25%", "50%", "75%", "100%"]
        legend = " ".join(svg_texts(browser, ".legend"))
        for name in ("v1", "v2", "old", "rollout step", "reload", "rejected reload"):
            assert name in legend
        # weight, effective weight: the same without a rollout.
        cells = backend_cells(browser)
        assert [cells[name][2:4] for name in ("v1", "v2", "old")] == [
            ["3", "3"],
            ["1", "1"],
            ["1", "1"],
        ]

        # A rollout v1 -> v2 in two 1-second steps, added by a reload; traffic throughout.
        running.write_config(routes(port, addresses, old=True, rollout=True))
        assert admin.post("/-/reload").status == 200
        # Paused for a few intervals of traffic, then resumed.
        assert admin.post("/rollout/shop/pause").status == 200
        paused_at = shop(admin)["history"][-1]["at"]  # the interval under way: now

        def some_intervals_later() -> bool:
            greetings(port, 4)
            finished = shop(admin)["history"][-2]["at"]
            return bool(finished >= paused_at + 2 * pool.HISTORY_INTERVAL_S)

        wait_until(some_intervals_later, what="traffic while paused")
        assert admin.post("/rollout/shop/resume").status == 200

        def completed() -> bool:
            greetings(port, 4)
            return bool(shop(admin)["rollout"]["state"] == "completed")

        wait_until(completed, what="the rollout completed")
        look(browser, admin, "rollout")
        # Each mark once; marks closer than a few pixels share a label.
        marks = " · ".join(svg_texts(browser, ".chart svg text[class^=m-]")).split(" · ")
        for mark in ("start", "reload", "step 1: 25%", "step 2: 75%", "100%", "completed"):
            assert marks.count(mark) == 1, marks
        listener = shop(admin)
        effective = {b["name"]: b["effective_weight"] for b in listener["backends"]}
        weights = {b["name"]: b["weight"] for b in listener["backends"]}
        assert effective != weights
        cells = backend_cells(browser)
        for name in ("v1", "v2"):
            assert cells[name][2:4] == [str(weights[name]), str(effective[name])]
        assert browser.evaluate("document.querySelector('.chart path.target') !== null")
        assert svg_texts(browser, ".chart svg g > text.paused") == ["paused"]

        # A drain: `old` leaves the config with two connections open. The completed rollout
        # gives v2 the pair's whole weight (v1 3 + v2 1), old keeps its 1: old 2 of 10.
        with clients(port, 10) as held:
            assert sorted(c.greeting() for c in held).count("old") == 2
            running.write_config(routes(port, addresses, old=False, rollout=True))
            assert admin.post("/-/reload").status == 200
            draining = admin.get("/connections?backend=old").json()["connections"]
            assert len(draining) == 2
            look(browser, admin, "drain")
            text = browser.evaluate("document.querySelector('.conns').innerText")
            assert "draining" in text
            assert "2 left" in text
            for conn in draining:
                assert conn["client"] in text

            # A bad reload: the old config keeps serving, the page says so, the chart marks it.
            running.write_config(routes(port, addresses, old=False, rollout=True) + "oops: 1\n")
            assert admin.post("/-/reload").status == 400
            look(browser, admin, "bad_reload")
            errors = browser.evaluate("document.querySelector('.errors').innerText")
            assert "previous config keeps serving" in errors
            assert "oops" in errors
            marks = " · ".join(svg_texts(browser, ".chart svg text[class^=m-]")).split(" · ")
            assert "rejected" in marks, marks
    finally:
        browser.close()
