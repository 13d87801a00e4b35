"""/metrics of a proxy with many backends: the text is written off the event loop, so relayed
connections go on while a scrape is being written, and the scrape shows one moment."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable

import pytest

from tcpproxy import metrics
from tcpproxy.proxy import Proxy
from tests.harness import WAIT_S, Backends, Client, RunningProxy, config_yaml, free_port
from tests.integration import admin_http
from tests.integration.admin_http import Admin, Response, Scrape

Start = Callable[[str], RunningProxy]
StartAdmin = Callable[[Proxy], Admin]
admins = pytest.fixture(admin_http.admins)

MANY = 2000


def many_backends_config(app: int, many: int, address: str) -> str:
    lines = [
        "  - name: app",
        f'    bind: "127.0.0.1:{app}"',
        "    backends:",
        f'      - {{name: v1, address: "{address}"}}',
        "  - name: many",
        f'    bind: "127.0.0.1:{many}"',
        "    backends:",
        *(f'      - {{name: b{i}, address: "{address}", weight: 1}}' for i in range(MANY)),
    ]
    return config_yaml("\n".join(lines) + "\n")


def test_a_relayed_connection_keeps_echoing_while_a_scrape_is_being_written(
    backends: Backends,
    start_proxy: Start,
    admins: StartAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1 = backends.start("v1")
    app = free_port()
    running = start_proxy(many_backends_config(app, free_port(), v1))
    admin = admins(running.proxy)
    held = Client(app)
    assert held.greeting() == "v1"
    # The scrape's text stays in the writing until the test lets it go on.
    writing, go_on = threading.Event(), threading.Event()
    write = metrics.render

    def render_when_told(*args: object) -> bytes:
        writing.set()
        assert go_on.wait(WAIT_S)
        return write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics, "render", render_when_told)
    scraped: list[Response] = []
    scraper = threading.Thread(target=lambda: scraped.append(admin.get("/metrics")))
    scraper.start()
    try:
        assert writing.wait(WAIT_S), "the scrape never started writing"

        # Meanwhile the data plane goes on: the held connection echoes, a new one is served.
        for i in range(20):
            line = f"line {i} while the scrape is written\n".encode()
            assert held.echo(line) == line
        fresh = Client(app)
        assert fresh.greeting() == "v1"
        fresh.close()
        assert scraper.is_alive()  # still writing: all of that happened during the scrape
    finally:
        go_on.set()
        scraper.join(WAIT_S)
    held.close()

    (response,) = scraped
    assert response.status == 200
    scrape = Scrape(response.text)
    assert not scrape.duplicates
    assert scrape.value("tcpproxy_backend_weight", listener="many", backend=f"b{MANY - 1}") == 1
    # One moment: the snapshot was taken before the second connection was made.
    assert scrape.value("tcpproxy_connections_total", listener="app", backend="v1") == 1
    assert running.metric("tcpproxy_connections_total", listener="app", backend="v1") == 2


def test_scrapes_that_come_together_share_one_text(
    backends: Backends,
    start_proxy: Start,
    admins: StartAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1 = backends.start("v1")
    running = start_proxy(many_backends_config(free_port(), free_port(), v1))
    admin = admins(running.proxy)
    go_on = threading.Event()
    written = []
    write = metrics.render

    def render_when_told(*args: object) -> bytes:
        assert go_on.wait(WAIT_S)
        written.append(1)
        return write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(metrics, "render", render_when_told)
    asked = threading.Semaphore(0)
    exposition = metrics.Metrics.exposition

    async def counted(self: metrics.Metrics, accept_gzip: bool = False) -> tuple[bytes, bool]:
        asked.release()
        return await exposition(self, accept_gzip)

    monkeypatch.setattr(metrics.Metrics, "exposition", counted)
    plain: list[Response] = []
    zipped: list[Response] = []
    scrapers = [
        threading.Thread(target=lambda: plain.append(admin.get("/metrics"))),
        threading.Thread(
            target=lambda: zipped.append(
                admin.request("/metrics", headers={"Accept-Encoding": "gzip"})
            )
        ),
    ]
    for scraper in scrapers:
        scraper.start()
    try:
        for _ in scrapers:  # both scrapes are in while the first text is being written
            assert asked.acquire(timeout=WAIT_S)
    finally:
        go_on.set()
        for scraper in scrapers:
            scraper.join(WAIT_S)

    assert written == [1]
    assert zipped[0].headers.get("Content-Encoding") == "gzip"
    assert gzip.decompress(zipped[0].body) == plain[0].body
