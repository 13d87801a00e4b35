"""PROXY protocol v1 and v2 (haproxy.org/download/2.6/doc/proxy-protocol.txt). Pure code.

Sent to backends so they see the client's address; accepted from a load balancer in front
(GCP's TCP proxy load balancer sends v1). Parsing is bounded: a header longer than
MAX_HEADER_BYTES, or not a PROXY header at all, is an error, never a wait for more bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the spec's bound, CRLF included
MAX_HEADER_BYTES = 16 + 536  # v2: fixed part + room for addresses and a few TLVs

_V2_CMD_LOCAL = 0x20
_V2_CMD_PROXY = 0x21
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed header: the original client (None for LOCAL/UNKNOWN) and its length."""

    source: Address | None
    destination: Address | None
    length: int


def build_v1(source: Address, destination: Address) -> bytes:
    family = _family(source[0], destination[0])
    if family is None:
        return b"PROXY UNKNOWN\r\n"
    line = f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def build_v2(source: Address, destination: Address) -> bytes:
    family = _family(source[0], destination[0])
    if family is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_CMD_LOCAL, 0, 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    code = _V2_TCP4 if family == "TCP4" else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_CMD_PROXY, code, len(body)) + body


def build(version: str, source: Address, destination: Address) -> bytes:
    return build_v1(source, destination) if version == "v1" else build_v2(source, destination)


def _family(*hosts: str) -> str | None:
    try:
        versions = {ipaddress.ip_address(h.split("%")[0]).version for h in hosts}
    except ValueError:
        return None
    if versions == {4}:
        return "TCP4"
    if versions == {6}:
        return "TCP6"
    return None


def parse(data: bytes, eof: bool = False) -> Header | None:
    """The header at the start of `data`; None if more bytes are needed. `eof`: the client has
    sent its FIN, so no more bytes will come and a header still incomplete is an error."""
    header = _parse(data)
    if header is None and eof:
        raise ProxyProtocolError(f"connection closed after {len(data)} bytes of a PROXY header")
    return header


def _parse(data: bytes) -> Header | None:
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < len(V2_SIGNATURE):
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX[: len(data)]) and len(data) < len(V1_PREFIX):
        return None
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyProtocolError("v1 header longer than 107 bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("v1 header with a bare CR or LF")
        return None
    try:
        parts = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    if parts[1:2] == ["UNKNOWN"]:
        return Header(None, None, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("v1 header: expected PROXY TCP4|TCP6 src dst sport dport")
    _, family, src, dst, sport, dport = parts
    version = 4 if family == "TCP4" else 6
    return Header((_ip(src, version), _port(sport)), (_ip(dst, version), _port(dport)), end + 2)


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header: bad address {text[:40]!r}") from None
    if address.version != version:
        raise ProxyProtocolError(f"v1 header: {text!r} is not IPv{version}")
    return str(address)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError(f"v1 header: bad port {text[:10]!r}")
    return int(text)


def _parse_v2(data: bytes) -> Header | None:
    if len(data) < 16:
        return None
    command, family, length = struct.unpack("!BBH", data[12:16])
    if command >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {command >> 4}, expected 2")
    if 16 + length > MAX_HEADER_BYTES:
        raise ProxyProtocolError(f"v2 header: {length} bytes of addresses is too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if command == _V2_CMD_LOCAL:
        return Header(None, None, total)
    if command != _V2_CMD_PROXY:
        raise ProxyProtocolError(f"v2 header: unknown command {command & 0x0F}")
    body = data[16:total]
    if family == _V2_TCP4 and length >= 12:
        src, dst = str(ipaddress.IPv4Address(body[:4])), str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == _V2_TCP6 and length >= 36:
        src, dst = str(ipaddress.IPv6Address(body[:16])), str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
    elif family in (_V2_TCP4, _V2_TCP6):
        raise ProxyProtocolError("v2 header: address block too short")
    else:
        return Header(None, None, total)  # UNSPEC or a non-TCP family: no usable address
    return Header((src, sport), (dst, dport), total)
