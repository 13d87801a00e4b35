"""PROXY protocol headers: round trips and bounded parsing of anything."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.proxy_protocol import (
    MAX_HEADER_BYTES,
    V2_SIGNATURE,
    Header,
    ProxyProtocolError,
    build,
    build_v1,
    parse,
)

Pair = tuple[tuple[str, int], tuple[str, int]]
ports = st.integers(min_value=0, max_value=65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
pairs = st.one_of(
    st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
    st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)),
)


@given(pair=pairs, version=st.sampled_from(["v1", "v2"]), tail=st.binary(max_size=64))
def test_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]], version: str, tail: bytes
) -> None:
    source, destination = pair
    header = build(version, source, destination)
    parsed = parse(header + tail)
    assert parsed == Header(
        (str(ipaddress.ip_address(source[0])), source[1]),
        (str(ipaddress.ip_address(destination[0])), destination[1]),
        len(header),
    )


@given(pair=pairs, version=st.sampled_from(["v1", "v2"]), data=st.data())
def test_every_strict_prefix_needs_more(pair: Pair, version: str, data: st.DataObject) -> None:
    header = build(version, *pair)
    cut = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    assert parse(header[:cut]) is None


@given(pair=pairs, version=st.sampled_from(["v1", "v2"]), data=st.data())
def test_a_strict_prefix_then_eof_is_an_error(
    pair: Pair, version: str, data: st.DataObject
) -> None:
    header = build(version, *pair)
    cut = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    with pytest.raises(ProxyProtocolError, match="connection closed"):
        parse(header[:cut], eof=True)


@given(pair=pairs, version=st.sampled_from(["v1", "v2"]), tail=st.binary(max_size=64))
def test_a_whole_header_then_eof_is_a_header(pair: Pair, version: str, tail: bytes) -> None:
    header = build(version, *pair)
    assert parse(header + tail, eof=True) == parse(header + tail)


@given(st.binary(max_size=2 * MAX_HEADER_BYTES))
def test_any_bytes_parse_or_fail_cleanly_within_the_bound(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if result is None:
        # Waiting for more is only allowed while still under the size bound.
        assert len(data) < MAX_HEADER_BYTES
    else:
        assert 0 < result.length <= min(len(data), MAX_HEADER_BYTES)


def test_examples_from_the_spec() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /"
    assert parse(line) == Header(("192.168.0.1", 56324), ("192.168.0.11", 443), 47)
    assert parse(b"PROXY UNKNOWN\r\n") == Header(None, None, 15)
    assert build_v1(("::1", 1), ("10.0.0.1", 2)) == b"PROXY UNKNOWN\r\n"  # mixed families
    local = V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
    assert parse(local) == Header(None, None, 16)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY " + b"A" * 120,
        V2_SIGNATURE + bytes([0x11, 0x11, 0x00, 0x0C]) + bytes(12),  # version 1
        V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # too long
        V2_SIGNATURE + bytes([0x21, 0x11, 0x00, 0x04]) + bytes(4),  # short addresses
    ],
)
def test_malformed_headers_are_errors(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)
