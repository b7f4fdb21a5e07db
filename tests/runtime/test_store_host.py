"""The store and gloo listen on this host's address alone; mixed-host Worlds are refused."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os

import pytest

from elastic.base.addr import local_addresses, split_hostport
from elastic.base.errors import ConfigError
from elastic.coord.world import World, WorldMember


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on (from /proc)."""
    import ipaddress

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                raw = bytes.fromhex(hexaddr)
                # /proc prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                found.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return found


def test_the_store_of_a_single_host_job_listens_on_loopback_only() -> None:
    from elastic.train.group import StoreHost

    host = StoreHost("127.0.0.1", timeout=5)
    mine = {entry for entry in _listening(os.getpid()) if entry[1] == host.port}
    assert mine == {("127.0.0.1", host.port)}
    assert host.address == f"127.0.0.1:{host.port}"


def test_a_store_on_ipv6_loopback_is_advertised_in_brackets_and_reached() -> None:
    if not any(ip == "::1" for _, ip in local_addresses()):
        pytest.skip("no IPv6 loopback here")
    import torch.distributed as dist

    from elastic.train.group import StoreHost

    host = StoreHost("::1", timeout=5)
    assert host.address == f"[::1]:{host.port}"
    name, port = split_hostport(host.address)
    client = dist.TCPStore(
        name, port, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=5)
    )
    client.set("k", "v")
    assert host.store.get("k") == b"v"


def test_a_store_on_an_address_of_no_interface_here_is_refused() -> None:
    from elastic.train.group import StoreHost

    with pytest.raises(ConfigError, match="advertise_host 203.0.113.77 is not an address"):
        StoreHost("203.0.113.77")


def test_a_loopback_member_in_a_world_with_other_hosts_refuses_to_form_naming_both() -> None:
    import torch.distributed as dist

    from elastic.train.group import StoreHost, WorkerGroup

    host = StoreHost("127.0.0.1", timeout=5)
    world = World(
        "j",
        1,
        (
            WorldMember("here", "127.0.0.1", host.address),
            WorldMember("there", "10.213.7.2", "10.213.7.2:1"),
        ),
    )
    with pytest.raises(ConfigError) as err:
        WorkerGroup(world, 0, host, timeout=5).form()
    assert "127.0.0.1 is loopback, but member there is on another host (10.213.7.2)" in str(
        err.value
    )
    assert not dist.is_initialized()


def _form_alone(queue) -> None:
    from elastic.train.group import StoreHost, WorkerGroup

    os.environ.pop("GLOO_SOCKET_IFNAME", None)
    host = StoreHost("127.0.0.1", timeout=10)
    world = World("j", 1, (WorldMember("a", "127.0.0.1", host.address),))
    group = WorkerGroup(world, 0, host, timeout=10, backend="gloo").form()
    queue.put((os.environ.get("GLOO_SOCKET_IFNAME"), sorted(_listening(os.getpid()))))
    group.close()


def test_gloo_is_given_the_interface_of_this_hosts_address() -> None:
    ctx = mp.get_context("spawn")  # the environment change stays in the child
    queue = ctx.Queue()
    proc = ctx.Process(target=_form_alone, args=(queue,))
    proc.start()
    try:
        ifname, listening = queue.get(timeout=120)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    loopback = {name for name, ip in local_addresses() if ip == "127.0.0.1"}
    assert ifname in loopback
    assert listening and all(ip == "127.0.0.1" for ip, _ in listening), listening
