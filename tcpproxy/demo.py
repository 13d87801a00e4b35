"""The demo backend (`tcpproxy echo`) and the self-contained demo (`tcpproxy demo`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from tcpproxy.config import split_host_port
from tcpproxy.proxy import Proxy, os_error_text
from tcpproxy.settings import Settings

log = logging.getLogger("tcpproxy.demo")

DEMO_CONFIG_PATH = Path("config/demo.yaml")
DEMO_BACKENDS = (("v1", "127.0.0.1:9101"), ("v2", "127.0.0.1:9102"))
# Kept identical to config/demo.yaml (a test checks), so that `tcpproxy demo` also works
# from an installed package, outside a checkout.
DEMO_CONFIG = """\
# The demo: two echo backends behind one listener on :8008.
# Edit the weights and save: new connections follow at once, open ones stay where they are.
# Remove a backend and its open connections drain: they are closed after drain_timeout.
listeners:
  - name: demo
    bind: "0.0.0.0:8008"
    backends:
      - name: v1
        address: "127.0.0.1:9101"
        weight: 80
      - name: v2
        address: "127.0.0.1:9102"
        weight: 20
    drain_timeout: 60s
    connect_timeout: 2s
    idle_timeout: 1h
"""
# Echo bytes a client has not taken, per connection, before the echo stops reading from it.
ECHO_WRITE_HIGH_WATER_BYTES = 64 * 1024


class EchoProtocol(asyncio.Protocol):
    """Greets with its name, then sends back every byte it receives.

    Flow control: while the client does not take the echo (its socket is full), the bytes
    wait in the transport's write buffer; above ECHO_WRITE_HIGH_WATER_BYTES the transport
    calls pause_writing and the client is not read until the buffer has drained below the
    low-water mark (resume_writing). A client that sends and never reads is then held back by
    TCP itself, and the echo holds at most the high-water mark plus one read per connection.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=ECHO_WRITE_HIGH_WATER_BYTES)
        transport.write(f"hello from {self.name}\n".encode())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_writing(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        # Client is done sending: finish our echo, then close (False closes after flushing).
        return False


async def start_echo(name: str, listen: str) -> asyncio.AbstractServer:
    host, port = split_host_port(listen)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: EchoProtocol(name), host, port, reuse_address=True)


async def echo_main(name: str, listen: str) -> int:
    from tcpproxy.server import wait_for_stop_signal  # noqa: PLC0415

    try:
        server = await start_echo(name, listen)
    except OSError as exc:
        print(f"--listen {listen}: cannot listen: {os_error_text(exc)}", file=sys.stderr)
        return 1
    log.info("echo backend %s listening on %s", name, listen)
    await wait_for_stop_signal()
    server.close()
    return 0


@contextlib.contextmanager
def demo_config(given: Path | None = None) -> Iterator[Path]:
    """The demo's config: `given`, else config/demo.yaml in a checkout, else a copy of the
    built-in one in a temporary directory that goes when the demo ends."""
    if given is not None:
        yield given
    elif DEMO_CONFIG_PATH.is_file():
        yield DEMO_CONFIG_PATH
    else:
        with tempfile.TemporaryDirectory(prefix="tcpproxy-demo-") as directory:
            path = Path(directory) / "demo.yaml"
            path.write_text(DEMO_CONFIG)
            yield path


async def demo_main(settings: Settings) -> int:
    from tcpproxy.server import serve  # noqa: PLC0415

    servers = []
    for name, address in DEMO_BACKENDS:
        try:
            servers.append(await start_echo(name, address))
        except OSError as exc:
            print(
                f"demo backend {name}: cannot listen on {address}: {os_error_text(exc)}",
                file=sys.stderr,
            )
            return 1

    async def started(proxy: Proxy) -> None:
        admin = settings.admin
        lines = [
            "",
            "tcpproxy demo is running:",
            *(
                f"  {lst.name}: {lst.config.bind} -> "
                + ", ".join(
                    f"{b.name} ({b.address}) weight {b.weight}" for b in lst.backends.values()
                )
                for lst in proxy.listeners.values()
            ),
            f"  status page: http://{admin}/" if admin != "off" else "  admin: off",
            "",
            "Try it:",
            "  telnet localhost 8008    (greeted by v1 or v2; type a line, it comes back)",
            f"  then edit {settings.config} and change the weights: new connections follow,",
            "  connections already open stay on their backend.",
            "Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)

    try:
        return await serve(settings, started)
    finally:
        for server in servers:
            server.close()
