"""Web pages cannot drive the admin API: a real headless Chromium loads a page from another
loopback origin that tries every way a page has to send a POST (auto-submitting forms, text/
plain and urlencoded; fetch() with and without a body; a CORS fetch with JSON; a beacon), at
a proxy started as users start it, with no token on a loopback admin address (the demo's
setup: the most a page could hope for). Nothing may change: the running rollout keeps
running, the paused one stays paused, and the changed config on disk is not applied.

The page reports back to the server it came from once every attempt has been answered (or
blocked by the browser); the test waits for that report, not for a duration.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.browser import CHROMIUM_TIMEOUT_S, chromium_command
from tests.e2e.processes import START_S, Process, http
from tests.harness import config_yaml, free_port, listener_yaml, wait_until

# Every attempt: (name, kind, path). Forms navigate an iframe each; fetches and the beacon
# run from the page's script.
ATTEMPTS = [
    ("form-text-abort", "form-text", "/rollout/shop/abort"),
    ("form-urlencoded-pause", "form-urlencoded", "/rollout/shop/pause"),
    ("form-urlencoded-resume", "form-urlencoded", "/rollout/cart/resume"),
    ("form-text-reload", "form-text", "/-/reload"),
    ("fetch-text-abort", "fetch-text", "/rollout/shop/abort"),
    ("fetch-nobody-resume", "fetch-nobody", "/rollout/cart/resume"),
    ("fetch-nobody-reload", "fetch-nobody", "/-/reload"),
    ("fetch-json-abort", "fetch-json", "/rollout/shop/abort"),
    ("beacon-pause", "beacon", "/rollout/shop/pause"),
]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>not the admin</title></head><body>
<script>
var ADMIN = __ADMIN__, ATTEMPTS = __ATTEMPTS__, results = {}, pending = ATTEMPTS.length;
function done(name, outcome) {
  results[name] = outcome;
  if (--pending === 0) {
    fetch("/report", {method: "POST", body: JSON.stringify(results)});
  }
}
ATTEMPTS.forEach(function (attempt) {
  var name = attempt[0], kind = attempt[1], url = ADMIN + attempt[2];
  if (kind.indexOf("form-") === 0) {
    var frame = document.createElement("iframe");
    frame.name = name;
    document.body.appendChild(frame);
    // After the frame's initial about:blank: this fires when the POST's answer has loaded.
    frame.onload = function () { done(name, "answered"); };
    var form = document.createElement("form");
    form.method = "POST";
    form.action = url;
    form.target = name;
    if (kind === "form-text") form.enctype = "text/plain";
    var field = document.createElement("input");
    field.name = "x";
    field.value = "1";
    form.appendChild(field);
    document.body.appendChild(form);
    form.submit();
  } else if (kind === "beacon") {
    done(name, navigator.sendBeacon(url) ? "queued" : "refused by the browser");
  } else {
    var init = {method: "POST", mode: "no-cors"};
    if (kind === "fetch-text") init.body = "x=1";
    if (kind === "fetch-json") {
      init = {method: "POST", mode: "cors", body: "{}",
              headers: {"Content-Type": "application/json"}};
    }
    fetch(url, init).then(function (r) { done(name, "answered " + r.type); },
                          function (e) { done(name, "blocked: " + e); });
  }
});
</script>
</body></html>
"""


class AttackSite:
    """The other origin: serves the page, receives its report."""

    def __init__(self, host: str, admin: str) -> None:
        self.report: dict[str, str] | None = None
        self.reported = threading.Event()
        page = (
            PAGE.replace("__ADMIN__", json.dumps(admin))
            .replace("__ATTEMPTS__", json.dumps(ATTEMPTS))
            .encode()
        )
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                site.report = json.loads(body)
                self.send_response(204)
                self.end_headers()
                site.reported.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def attack_site(host: str, admin: str) -> Iterator[AttackSite]:
    site = AttackSite(host, admin)
    try:
        yield site
    finally:
        site.close()


def routes(port: int, other: int, v1: str, v2: str, idle: str = "1h") -> str:
    """Listeners shop and cart, each with an hour-long rollout from v1 to v2."""
    block = (
        "    rollout:\n      from: v1\n      to: v2\n      steps: [10, 50]\n"
        "      step_duration: 1h\n"
    )
    return config_yaml(
        *(
            listener_yaml(name, p, {"v1": (v1, 1), "v2": (v2, 0)}, idle_timeout=idle) + block
            for name, p in (("shop", port), ("cart", other))
        )
    )


def rollout_states(base: str) -> dict[str, str]:
    status = json.loads(http(f"{base}/status")[1])
    return {lst["name"]: lst["rollout"]["state"] for lst in status["listeners"]}


@pytest.mark.parametrize(
    "attacker",
    ["127.0.0.2", "127.0.0.1"],  # another loopback address; the same one on another port
)
def test_a_page_from_another_origin_changes_nothing(
    tmp_path: Path, echo_backends: dict[str, str], attacker: str
) -> None:
    port, other, admin_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{admin_port}"
    path = tmp_path / "tcpproxy.yaml"
    v1, v2 = echo_backends["v1"], echo_backends["v2"]
    path.write_text(routes(port, other, v1, v2))
    proc = Process(
        "run", "--config", str(path), "--admin", f"127.0.0.1:{admin_port}",
        "--no-watch", "--poll-interval", "0",
    )  # fmt: skip
    try:
        wait_until(lambda: http(f"{base}/readyz")[0] == 200, timeout=START_S, what="ready")
        # An operator paused cart (a request from a local client, no Origin: allowed).
        assert http(f"{base}/rollout/cart/pause", method="POST")[0] == 200
        status = json.loads(http(f"{base}/status")[1])
        # A changed file that only a reload would apply.
        path.write_text(routes(port, other, v1, v2, idle="2h"))
        assert rollout_states(base) == {"shop": "running", "cart": "paused"}

        with attack_site(attacker, base) as site:
            browser = subprocess.Popen(
                chromium_command(
                    tmp_path / "profile", "--virtual-time-budget=30000", "--dump-dom", site.url
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                reported = site.reported.wait(CHROMIUM_TIMEOUT_S)
            finally:
                if browser.poll() is None:
                    browser.send_signal(signal.SIGTERM)
                _, browser_err = browser.communicate(timeout=CHROMIUM_TIMEOUT_S)
            assert reported, f"the page never reported: {browser_err[-2000:]}"
        assert site.report is not None
        # Every attempt was made and got an answer from the server, or was stopped by the
        # browser itself (the CORS preflight for JSON is refused).
        assert set(site.report) == {name for name, _, _ in ATTEMPTS}
        for name, _, _ in ATTEMPTS:
            if name.startswith("form-"):
                assert site.report[name] == "answered", (name, site.report)
            elif name.startswith("fetch-json"):
                assert site.report[name].startswith("blocked"), (name, site.report)
            elif name.startswith("fetch-"):
                assert site.report[name] == "answered opaque", (name, site.report)

        after = json.loads(http(f"{base}/status")[1])
        assert rollout_states(base) == {"shop": "running", "cart": "paused"}
        assert after["sha256"] == status["sha256"], "the page reloaded the config"
        assert after["last_reload"] == status["last_reload"]

        proc.signal(signal.SIGTERM)
        code, _, err = proc.wait()
        assert code == 0, err
    finally:
        proc.kill()
    # Each attempt that reached the server is in its log, with where it came from.
    refused = [line for line in err.splitlines() if "admin API: refused" in line]
    assert refused, err
    assert all("cross-site request refused" in line for line in refused), refused
    assert "rollout aborted" not in err
    assert "rollout resumed" not in err
