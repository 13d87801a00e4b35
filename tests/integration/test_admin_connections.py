"""The admin server's connections over real sockets: the read timeout closes slow and idle
clients, the cap holds however many connect, and /livez answers throughout.

No test waits a fixed time: each one reads until the server closes the connection, with a
generous socket timeout that only a server that never closes would reach.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tcpproxy.admin import AdminOptions
from tcpproxy.proxy import Proxy
from tests.harness import LoopThread
from tests.integration import admin_http
from tests.integration.admin_http import Admin, StartAdmin

admins = pytest.fixture(admin_http.admins)
# Only a server that never closes the connection makes a test wait this long.
CLOSE_WAIT_S = 30.0
HALF_REQUEST = b"GET /livez HT"


@pytest.fixture
def proxy(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Proxy]:
    """A proxy with no config applied: the admin server is all these tests need of it."""
    proxy = loop_thread.call(Proxy, tmp_path / "tcpproxy.yaml", 0.0)
    yield proxy
    loop_thread.run(proxy.shutdown(0))


@contextmanager
def connections(admin: Admin, n: int, send: bytes = HALF_REQUEST) -> Iterator[list[socket.socket]]:
    """`n` connections, made one after the other, each having sent `send`."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", admin.port), timeout=CLOSE_WAIT_S)
            socks.append(sock)
            if send:
                sock.sendall(send)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (EOF or reset)."""
    sock.settimeout(CLOSE_WAIT_S)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def livez(admin: Admin) -> None:
    response = admin.get("/livez")
    assert (response.status, response.text) == (200, "ok\n")


def test_the_read_timeout_closes_half_sent_requests(proxy: Proxy, admins: StartAdmin) -> None:
    admin = admins(proxy, AdminOptions(read_timeout=0.5))
    with connections(admin, 20) as slow, connections(admin, 5, send=b"") as silent:
        livez(admin)  # answered while they wait
        for sock in slow + silent:
            assert read_until_closed(sock) == b""  # closed, and nothing was answered
    livez(admin)


def test_the_read_timeout_closes_idle_keep_alive_connections(
    proxy: Proxy, admins: StartAdmin
) -> None:
    """The deadline is for receiving each request, not a limit on a connection's life: a
    client that keeps sending whole requests is answered on the same connection; once it
    stops, the connection is closed."""
    admin = admins(proxy, AdminOptions(read_timeout=5))
    request = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connections(admin, 3, send=b"") as idle:
        for sock in idle:
            for _ in range(10):
                sock.sendall(request)
                answer = b""
                while not answer.endswith(b"\r\n\r\nok\n"):
                    chunk = sock.recv(65536)
                    assert chunk, "closed while it was sending requests"
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        for sock in idle:
            assert read_until_closed(sock) == b""


def test_at_the_cap_the_longest_waiting_connections_make_room(
    proxy: Proxy, admins: StartAdmin
) -> None:
    """Far more slow clients than the cap: the server never holds more than the cap, closes
    the ones that have waited longest, and answers /livez all the while. (The timeout is long:
    here only the cap closes connections.)"""
    cap, flood = 8, 100
    admin = admins(proxy, AdminOptions(read_timeout=300, max_connections=cap))
    with connections(admin, cap) as first, connections(admin, flood) as more:
        # Connections are accepted in the order they were made: the first ones, then
        # all but the newest of the flood, had to make room.
        for sock in first + more[:-cap]:
            assert read_until_closed(sock) == b""
        livez(admin)  # takes the place of the oldest of the newest
        # The ones left are alive and answered once they finish their request.
        survivors = more[-cap + 1 :]
        for sock in survivors:
            sock.sendall(b"TP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert read_until_closed(sock).endswith(b"\r\n\r\nok\n")
    for _ in range(3 * cap):
        livez(admin)
