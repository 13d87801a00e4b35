"""The real admin server on the proxy's loop thread, and a blocking HTTP client for it.

Tests read the admin endpoints the way Prometheus, kubelet probes and people do: over HTTP,
from outside the event loop.
"""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tcpproxy.admin import AdminOptions, start_admin
from tcpproxy.proxy import Proxy
from tests.harness import LoopThread, free_port

HTTP_TIMEOUT_S = 10.0
Labels = frozenset[tuple[str, str]]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


class Scrape:
    """One /metrics scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}
        seen: Counter[tuple[str, Labels]] = Counter()
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                seen[key] += 1
                self.samples[key] = sample.value
        self.duplicates = [key for key, n in seen.items() if n > 1]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None when the series does not exist."""
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, **labels: str) -> list[tuple[str, Labels]]:
        """Every sample whose labels include these."""
        want = set(labels.items())
        return [key for key in self.samples if want <= key[1]]


class Admin:
    """The admin server of `proxy`, started on a free loopback port of its loop thread (or
    on `host`), with `options`. Requests carry the admin token when `options` has one."""

    def __init__(
        self,
        thread: LoopThread,
        proxy: Proxy,
        options: AdminOptions | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.thread = thread
        self.options = options or AdminOptions()
        self.port = free_port()
        self.address = f"{host}:{self.port}"
        self.runner: web.AppRunner = thread.run(start_admin(proxy, self.address, self.options))
        connect = "127.0.0.1" if host == "0.0.0.0" else host
        self.url = f"http://{connect}:{self.port}"
        self.token = self.options.token
        if self.options.token_file is not None:
            self.token = self.options.token_file.read_text().strip()

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        token: bool = True,
    ) -> Response:
        """Exactly these headers (plus Host, unless given, and Content-Length) and body.
        `token`: add the admin token (if there is one) to a state-changing request."""
        headers = dict(headers or {})
        if token and self.token is not None and method not in ("GET", "HEAD"):
            headers.setdefault("Authorization", f"Bearer {self.token}")
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Response(response.status, dict(response.headers), response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        return self.request(path)

    def post(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        token: bool = True,
    ) -> Response:
        return self.request(path, "POST", headers, body, token)

    def status(self) -> Any:
        response = self.get("/status")
        assert response.status == 200
        return response.json()

    def scrape(self) -> Scrape:
        response = self.get("/metrics")
        assert response.status == 200
        scrape = Scrape(response.text)
        assert not scrape.duplicates, scrape.duplicates
        return scrape

    def metric(self, name: str, **labels: str) -> float | None:
        return self.scrape().value(name, **labels)

    def close(self) -> None:
        self.thread.run(self.runner.cleanup())


class StartAdmin(Protocol):
    def __call__(
        self, proxy: Proxy, options: AdminOptions | None = None, host: str = "127.0.0.1"
    ) -> Admin: ...


def admins(loop_thread: LoopThread) -> Iterator[StartAdmin]:
    """Fixture body: start admin servers for proxies; they are stopped after the test.

    A test module says `admins = pytest.fixture(admin_http.admins)` to use it."""
    started: list[Admin] = []

    def start(proxy: Proxy, options: AdminOptions | None = None, host: str = "127.0.0.1") -> Admin:
        admin = Admin(loop_thread, proxy, options, host)
        started.append(admin)
        return admin

    yield start
    for admin in started:
        admin.close()


def backend_status(status: Any, listener: str, backend: str) -> Any:
    """One backend's entry in a /status document (KeyError if it is not there)."""
    for lst in status["listeners"]:
        if lst["name"] == listener:
            for b in lst["backends"]:
                if b["name"] == backend:
                    return b
    raise KeyError((listener, backend))
