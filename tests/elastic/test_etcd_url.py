"""`--etcd` endpoint lists in the forms etcdctl and Kubernetes use, IPv6; `etcd --listen`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from elastic.base.addr import local_addresses
from elastic.coord.etcd import EmbeddedEtcd, EtcdConfig, connect
from tests.conftest import REPO


@pytest.fixture
def fresh_etcd_v6(tmp_path: Any) -> Iterator[EmbeddedEtcd]:
    if not any(ip == "::1" for _, ip in local_addresses()):
        pytest.skip("no IPv6 loopback here")
    server = EmbeddedEtcd(data_dir=str(tmp_path / "etcd"), host="::1", die_with_parent=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "url, endpoints, secure",
    [
        (
            "http://a:2379,http://b:2379,http://c:2379",
            (("a", 2379), ("b", 2379), ("c", 2379)),
            False,
        ),
        ("http://a:2379,b:2379,c:2379", (("a", 2379), ("b", 2379), ("c", 2379)), False),
        ("https://a:1, https://b:2/", (("a", 1), ("b", 2)), True),
        ("http://[::1]:2379", (("::1", 2379),), False),
        (
            "http://[fd00::2]:2379,http://10.0.0.2:2379",
            (("fd00::2", 2379), ("10.0.0.2", 2379)),
            False,
        ),
    ],
)
def test_endpoint_lists_with_a_scheme_on_each_part_parse(
    url: str, endpoints: tuple, secure: bool
) -> None:
    cfg = EtcdConfig.from_url(url)
    assert cfg.endpoints == endpoints
    assert cfg.secure is secure
    # The canonical form names every endpoint fully and parses back to the same.
    assert EtcdConfig.from_url(cfg.url).endpoints == endpoints


def test_canonical_url_brackets_ipv6_and_repeats_the_scheme() -> None:
    cfg = EtcdConfig.from_url("http://[::1]:2379,b:2380")
    assert cfg.url == "http://[::1]:2379,http://b:2380"


def test_an_etcd_on_ipv6_loopback_is_reached_through_its_bracketed_url(fresh_etcd_v6) -> None:
    assert fresh_etcd_v6.url.startswith("http://[::1]:")
    client = connect(EtcdConfig.from_url(fresh_etcd_v6.url, connect_timeout=10.0))
    try:
        client.put("/ipv6-probe", b"1")
        assert client.get("/ipv6-probe")[0] == b"1"
    finally:
        client.close()


def test_etcd_listen_on_an_address_of_no_interface_here_is_refused(tmp_path: Any) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "etcd",
            "--listen",
            "203.0.113.77",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "elastic: error: --listen 203.0.113.77 is not an address of this machine" in done.stderr
    assert not (tmp_path / "d").exists(), "nothing may start on bad input"
