"""host:port parsing (config.split_host_port), as every address the proxy reads goes through
it: each accepted address is written one way only, so no two spellings name the same port
or host unnoticed."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpproxy.config import ConfigError, parse_config, split_host_port

ports = st.integers(min_value=1, max_value=65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
# Host names with a letter in their last label: never read as a number by the resolver.
names = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=10)),
    st.text(string.ascii_letters, min_size=1, max_size=6),
)
hosts = st.one_of(v4, names)
zeros = st.integers(min_value=1, max_value=3).map("0".__mul__)


def written(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@given(hosts, ports)
def test_host_and_port_come_back(host: str, port: int) -> None:
    assert split_host_port(f"{host}:{port}") == (host, port)


@given(v6, ports)
def test_bracketed_ipv6_and_port_come_back(host: str, port: int) -> None:
    assert split_host_port(f"[{host}]:{port}") == (host, port)


@given(st.one_of(st.text(max_size=30), st.builds("{}:{}".format, hosts, st.text(max_size=8))))
def test_an_accepted_address_has_one_spelling(text: str) -> None:
    try:
        host, port = split_host_port(text)
    except ValueError:
        return
    assert written(host, port) == text
    assert 1 <= port <= 65535


@given(st.one_of(hosts, v6), st.integers(min_value=0, max_value=65535), zeros)
def test_a_port_with_leading_zeros_is_refused(host: str, port: int, lead: str) -> None:
    text = written(host, port).rpartition(":")[0] + f":{lead}{port}"
    with pytest.raises(ValueError, match="leading zero"):
        split_host_port(text)


@given(
    st.lists(st.text(string.digits, min_size=1, max_size=4), min_size=1, max_size=5).map(".".join),
    ports,
)
def test_a_number_that_is_not_a_dotted_quad_is_refused(host: str, port: int) -> None:
    # The resolver reads "010.0.0.1" as 8.0.0.1 (octal) and "127.1" as 127.0.0.1.
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        with pytest.raises(ValueError, match="IPv4"):
            split_host_port(f"{host}:{port}")
    else:
        assert split_host_port(f"{host}:{port}") == (host, port)


@pytest.mark.parametrize("host", ["0x7f.1", "0x7f000001", "2130706433", "127.1", "010.0.0.1"])
def test_numbers_the_resolver_would_read_as_ipv4_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="IPv4"):
        split_host_port(f"{host}:8008")


@given(
    field=st.sampled_from(["bind", "address"]),
    port=st.integers(min_value=0, max_value=65535),
    lead=zeros,
)
def test_a_config_with_a_leading_zero_port_is_one_line_naming_file_and_field(
    field: str, port: int, lead: str
) -> None:
    bind, address = "127.0.0.1:8008", "127.0.0.1:9000"
    bad = f"127.0.0.1:{lead}{port}"
    if field == "bind":
        bind = bad
    else:
        address = bad
    text = (
        "listeners:\n"
        "  - name: a\n"
        f'    bind: "{bind}"\n'
        "    backends:\n"
        f'      - {{name: v1, address: "{address}"}}\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text.encode(), "routes.yaml")

    where = "listeners[0].bind" if field == "bind" else "listeners[0].backends[0].address"
    assert caught.value.problems == [
        f"routes.yaml: {where}: invalid address {bad!r}: port {lead}{port} has a leading zero"
    ]
