"""This host's address: validation, route detection, host:port forms, mixed-host refusal.

Only loopback is ever bound or routed to; an address "of no machine" is chosen
from TEST-NET-3 after checking this machine does not hold it.
"""

from __future__ import annotations

import socket

import pytest

from elastic.base.addr import (
    HostAddress,
    join_hostport,
    local_address,
    local_addresses,
    mixed_hosts,
    route_address,
    split_hostport,
    this_host,
)
from elastic.base.errors import ConfigError

FOREIGN = "203.0.113.77"


def _has_ipv6_loopback() -> bool:
    return any(ip == "::1" for _, ip in local_addresses())


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")


@pytest.mark.parametrize(
    "host, port, text",
    [
        ("10.0.0.1", 2379, "10.0.0.1:2379"),
        ("::1", 29500, "[::1]:29500"),
        ("fd00::2", 1, "[fd00::2]:1"),
        ("node-a.example", 80, "node-a.example:80"),
    ],
)
def test_host_and_port_round_trip_with_ipv6_in_brackets(host: str, port: int, text: str) -> None:
    assert join_hostport(host, port) == text
    assert split_hostport(text) == (host, port)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("::1:29500", "put an IPv6 address in brackets"),
        ("[::1:29500", "malformed address"),
        ("10.0.0.1", "malformed address"),
        ("10.0.0.1:0", "malformed address"),
        ("10.0.0.1:http", "malformed address"),
        (":2379", "malformed address"),
    ],
)
def test_malformed_host_and_port_is_refused_naming_it(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        split_hostport(text)
    assert repr(text) in str(err.value)


def test_local_addresses_include_loopback_on_its_interface() -> None:
    addresses = local_addresses()
    assert any(ip == "127.0.0.1" for _, ip in addresses), addresses
    assert all(name for name, _ in addresses)


def test_loopback_is_an_address_of_this_machine_owned_by_a_loopback_interface() -> None:
    host = local_address("127.0.0.1")
    assert host.ip == "127.0.0.1" and host.is_loopback and host.family == socket.AF_INET
    assert (host.interface, "127.0.0.1") in local_addresses()


def test_a_host_name_is_resolved_before_it_is_checked() -> None:
    assert local_address("localhost").is_loopback


@needs_ipv6
def test_ipv6_loopback_is_accepted_and_bracketed_in_host_port() -> None:
    host = local_address("::1")
    assert host.family == socket.AF_INET6
    assert host.hostport(5) == "[::1]:5"


def test_an_address_of_no_interface_here_is_refused_listing_this_machines_addresses() -> None:
    assert FOREIGN not in {ip for _, ip in local_addresses()}
    with pytest.raises(ConfigError) as err:
        local_address(FOREIGN)
    message = str(err.value)
    assert message.startswith(
        f"--host {FOREIGN} is not an address of this machine; its addresses: "
    )
    assert "127.0.0.1 (" in message


def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(ConfigError, match="'no-such-host.invalid' does not resolve"):
        local_address("no-such-host.invalid")


def test_the_route_to_a_loopback_etcd_starts_on_loopback() -> None:
    assert route_address("127.0.0.1", 2379) == "127.0.0.1"
    assert route_address("localhost", 2379) in ("127.0.0.1", "::1")


@needs_ipv6
def test_the_route_to_an_ipv6_loopback_etcd_starts_on_ipv6_loopback() -> None:
    assert route_address("::1", 2379) == "::1"


def test_this_host_is_the_route_to_etcd_unless_host_is_given() -> None:
    assert this_host(None, [("127.0.0.1", 2379)]).ip == "127.0.0.1"
    # An explicit --host wins over the route (and is checked all the same).
    assert this_host("localhost", [(FOREIGN, 2379)]).is_loopback
    with pytest.raises(ConfigError, match=f"--host {FOREIGN} is not an address"):
        this_host(FOREIGN, [("127.0.0.1", 2379)])


def test_host_address_must_be_a_canonical_ip() -> None:
    with pytest.raises(ConfigError, match="not an IP address"):
        HostAddress("host.example", "eth0")
    with pytest.raises(ConfigError, match="canonical"):
        HostAddress("0:0::1", "lo")


def test_loopback_among_members_on_other_hosts_is_refused_naming_both() -> None:
    others = [("h1-0", "10.213.7.2"), ("h0-1", "127.0.0.1")]
    from_loopback = mixed_hosts("127.0.0.1", others)
    assert from_loopback is not None
    assert "this host's address 127.0.0.1 is loopback" in from_loopback
    assert "member h1-0 is on another host (10.213.7.2)" in from_loopback
    from_network = mixed_hosts("10.213.7.1", others)
    assert from_network is not None
    assert "member h0-1 advertises the loopback address 127.0.0.1" in from_network
    assert "(10.213.7.1)" in from_network


@pytest.mark.parametrize(
    "own, others",
    [
        ("127.0.0.1", [("a", "127.0.0.1"), ("b", "::1")]),  # one host
        ("10.213.7.1", [("a", "10.213.7.2"), ("b", "10.213.7.3")]),  # several, all reachable
        ("127.0.0.1", [("a", "")]),  # an old record without address
    ],
)
def test_members_all_on_loopback_or_all_on_the_network_form(own: str, others: list) -> None:
    assert mixed_hosts(own, others) is None
