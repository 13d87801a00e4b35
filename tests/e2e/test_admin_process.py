"""The admin settings of `tcpproxy run` as users pass them (flags and environment), and the
probes of a proxy whose data plane has used up every file descriptor it may open."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.processes import EXIT_S, START_S, Process, http
from tests.harness import Client, config_yaml, free_port, listener_yaml, wait_until

TOKEN = "e2e-admin-token-0123456789abcdef"


def rollout_routes(port: int, v1: str, v2: str) -> str:
    block = (
        "    rollout:\n      from: v1\n      to: v2\n      steps: [10, 50]\n"
        "      step_duration: 1h\n"
    )
    return config_yaml(listener_yaml("shop", port, {"v1": (v1, 1), "v2": (v2, 0)}) + block)


def wait_ready(proc: Process, base: str) -> None:
    def ready() -> bool:
        assert proc.popen.poll() is None, proc.wait()[2]
        return http(f"{base}/readyz")[0] == 200

    wait_until(ready, timeout=START_S, what="ready")


def rollout_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TCPPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "tcpproxy", "rollout", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=START_S,
        env={**clean, **(env or {})},
    )


def post_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    request = urllib.request.Request(url, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_run_with_a_token_file_on_every_interface(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    """The container's setup: the admin server on 0.0.0.0 and the token in a file (a mounted
    Secret); `tcpproxy rollout` reads the same file from the environment."""
    port, admin_port = free_port(), free_port()
    base = f"http://127.0.0.1:{admin_port}"
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(rollout_routes(port, echo_backends["v1"], echo_backends["v2"]))
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    proc = Process(
        "run", "--config", str(path), "--admin", f"0.0.0.0:{admin_port}",
        "--admin-token-file", str(token_file), "--log-format", "json",
    )  # fmt: skip
    try:
        wait_ready(proc, base)
        assert post_status(f"{base}/rollout/shop/pause")[0] == 401
        wrong = {"Authorization": "Bearer not-the-token-at-all-1234"}
        assert post_status(f"{base}/rollout/shop/pause", wrong)[0] == 401
        env = {"TCPPROXY_ADMIN_TOKEN_FILE": str(token_file)}
        paused = rollout_cli("pause", "--admin", f"0.0.0.0:{admin_port}", env=env)
        assert paused.returncode == 0, paused.stderr
        status = json.loads(http(f"{base}/status")[1])
        assert status["listeners"][0]["rollout"]["state"] == "paused"
        reload = post_status(f"{base}/-/reload", {"Authorization": f"Bearer {TOKEN}"})
        assert reload[0] == 200
        proc.signal(signal.SIGTERM)
        code, _, err = proc.wait()
        assert code == 0, err
    finally:
        proc.kill()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any("control endpoints need the admin token" in m for m in messages), messages
    [paused_line] = [
        line
        for line in lines
        if "rollout paused on this replica by an admin API" in line["message"]
    ]
    assert paused_line["message"].endswith("with the admin token")
    assert paused_line["client"].startswith("127.0.0.1:")
    assert TOKEN not in err


def test_run_without_a_token_on_every_interface_has_control_off(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    port, admin_port = free_port(), free_port()
    base = f"http://127.0.0.1:{admin_port}"
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(rollout_routes(port, echo_backends["v1"], echo_backends["v2"]))
    proc = Process("run", "--config", str(path), "--admin", f"0.0.0.0:{admin_port}")
    try:
        wait_ready(proc, base)
        for action in ("pause", "abort"):
            code, body = post_status(f"{base}/rollout/shop/{action}")
            assert code == 403
            assert "--admin-token-file or TCPPROXY_ADMIN_TOKEN" in json.loads(body)["error"]
        assert post_status(f"{base}/-/reload")[0] == 403
        refused = rollout_cli("abort", "--admin", f"0.0.0.0:{admin_port}")
        assert refused.returncode == 2
        assert "control endpoints are off" in refused.stderr
        status = json.loads(http(f"{base}/status")[1])
        assert status["listeners"][0]["rollout"]["state"] == "running"
        proc.signal(signal.SIGTERM)
        code, _, err = proc.wait()
        assert code == 0, err
    finally:
        proc.kill()
    assert "control endpoints are off" in err


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (EOF or reset); a generous timeout for a server that
    never does."""
    sock.settimeout(30)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_admin_limits_from_flag_and_environment(
    tmp_path: Path, echo_backends: dict[str, str]
) -> None:
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(
        config_yaml(listener_yaml("shop", free_port(), {"v1": (echo_backends["v1"], 1)}))
    )
    # The cap from a flag (and a read timeout no test reaches): the first of three slow
    # clients makes room for the third; the other two are still there.
    admin_port = free_port()
    base = f"http://127.0.0.1:{admin_port}"
    proc = Process(
        "run", "--config", str(path), "--admin", f"127.0.0.1:{admin_port}",
        "--admin-max-connections", "2", "--admin-read-timeout", "1h",
    )  # fmt: skip
    try:
        wait_ready(proc, base)
        slow = [socket.create_connection(("127.0.0.1", admin_port), timeout=30) for _ in range(3)]
        try:
            for sock in slow:
                sock.sendall(b"GET /livez HT")
            assert closed_by_server(slow[0])
            for sock in slow[1:]:
                sock.sendall(b"TP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert sock.recv(1024).startswith(b"HTTP/1.1 200 OK")
        finally:
            for sock in slow:
                sock.close()
    finally:
        proc.kill()
    # The read timeout from the environment.
    admin_port = free_port()
    base = f"http://127.0.0.1:{admin_port}"
    proc = Process(
        "run", "--config", str(path), "--admin", f"127.0.0.1:{admin_port}",
        env={"TCPPROXY_ADMIN_READ_TIMEOUT": "200ms"},
    )  # fmt: skip
    try:
        wait_ready(proc, base)
        with socket.create_connection(("127.0.0.1", admin_port), timeout=30) as sock:
            sock.sendall(b"GET /livez HT")
            assert closed_by_server(sock)
        assert http(f"{base}/livez") == (200, "ok\n")
    finally:
        proc.kill()


FD_LIMIT = 64  # as tests/e2e/test_resources.py: room for about 15 relayed connections


def test_probes_answer_while_the_data_plane_is_out_of_descriptors(tmp_path: Path) -> None:
    echo_port, port, admin_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{admin_port}"
    echo = subprocess.Popen(
        [sys.executable, "-m", "tcpproxy", "echo", "--listen", f"127.0.0.1:{echo_port}",
         "--name", "v1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    path = tmp_path / "tcpproxy.yaml"
    path.write_text(config_yaml(listener_yaml("w", port, {"v1": (f"127.0.0.1:{echo_port}", 1)})))
    # The shell lowers the limit for the proxy alone (preexec_fn is unsafe with threads).
    proxy = subprocess.Popen(
        ["sh", "-c", f'ulimit -n {FD_LIMIT} && exec "$0" "$@"', sys.executable, "-m",
         "tcpproxy", "run", "--config", str(path), "--admin", f"127.0.0.1:{admin_port}",
         "--no-access-log"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    clients: list[Client] = []
    try:
        wait_until(lambda: http(f"{base}/readyz")[0] == 200, timeout=START_S, what="ready")
        wait_until(lambda: served(port), timeout=START_S, what="proxy serving")
        # Connections until the proxy has no descriptor left for one more.
        refused = 0
        for _ in range(2 * FD_LIMIT):
            try:
                c = Client(port, timeout=5)
            except OSError:
                refused += 1
                continue
            clients.append(c)
            try:
                greeted = c.read_line().startswith("hello from")
            except OSError:
                greeted = False
            if not greeted:
                refused += 1
                if refused >= 3:
                    break
        assert refused >= 3, "the proxy never ran out of descriptors"
        # Probes, over and over: a spare descriptor each time, given back each time.
        for _ in range(3 * FD_LIMIT):
            assert http(f"{base}/livez") == (200, "ok\n")
            assert http(f"{base}/readyz") == (200, "ready\n")
        code, text = http(f"{base}/metrics")
        assert code == 503
        assert "out of file descriptors" in text
        assert not served(port), "descriptors were free again: the probes proved nothing"
        for c in clients:
            c.close()
        clients.clear()
        # Recovered: everything answers again.
        wait_until(lambda: http(f"{base}/metrics")[0] == 200, what="metrics again")
        wait_until(lambda: served(port), what="serving again")
    finally:
        for c in clients:
            c.close()
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=EXIT_S)
        echo.send_signal(signal.SIGTERM)
        echo.communicate(timeout=EXIT_S)
    assert proxy.returncode == 0, err
    assert "answering probes on spare descriptors" in err
    assert "Traceback" not in err


def served(port: int) -> bool:
    try:
        client = Client(port, timeout=5)
    except OSError:
        return False
    try:
        return client.read_line().startswith("hello from")
    except OSError:
        return False
    finally:
        client.close()
