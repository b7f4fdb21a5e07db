"""The test bed itself: hosts reach each other only, a pulled link is silence, nothing is left."""

from __future__ import annotations

import subprocess
import sys

from chaos import netbed as netns
from chaos.netbed import PREFIX, TestBed

# Listens on the host's address, answers one connection, exits.
_SERVE = (
    "import socket, sys\n"
    "s = socket.create_server((sys.argv[1], 5555))\n"
    "print('up', flush=True)\n"
    "c, _ = s.accept(); c.sendall(b'pong')\n"
)
# Exit 0 on an answer, 2 on a timeout, 3 on any other failure.
_CALL = (
    "import socket, sys\n"
    "try:\n"
    "    address, timeout = sys.argv[1], float(sys.argv[2])\n"
    "    with socket.create_connection((address, 5555), timeout=timeout) as c:\n"
    "        sys.exit(0 if c.recv(4) == b'pong' else 3)\n"
    "except TimeoutError:\n"
    "    sys.exit(2)\n"
    "except OSError:\n"
    "    sys.exit(3)\n"
)


def _serve(host) -> subprocess.Popen:
    proc = host.run([sys.executable, "-c", _SERVE, host.address], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def _call(host, address: str, timeout: float) -> int:
    return host.run([sys.executable, "-c", _CALL, address, str(timeout)]).wait(timeout + 30)


def test_hosts_reach_each_other_and_a_pulled_link_times_out_until_it_is_back(make_bed) -> None:
    bed = make_bed(2)
    a, b = bed.hosts
    server = _serve(a)
    assert _call(b, a.address, 10) == 0
    server.wait(timeout=30)
    # Each host's loopback is its own: b's 127.0.0.1 is not a's.
    _serve(a)
    assert _call(b, "127.0.0.1", 5) == 3
    b.link_down()
    assert _call(b, a.address, 1) == 2  # silence, like a cut cable, not a refusal
    b.link_up()
    assert _call(b, a.address, 10) == 0


def test_destroy_removes_every_namespace_device_and_process_and_may_repeat(bed_available) -> None:
    bed = TestBed(2).create()
    try:
        server = _serve(bed.hosts[0])
    finally:
        bed.destroy()
    assert server.poll() is not None
    bed.destroy()
    assert not {h.netns for h in bed.hosts} & set(netns._netns_names())
    assert not ({h.veth for h in bed.hosts} | {bed.bridge}) & set(netns._link_names())


def test_leftovers_of_a_bed_whose_owner_died_are_removed(bed_available) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=30)
    name = f"{PREFIX}{dead.pid}-h0"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        netns.clean_leftovers()
        assert name not in netns._netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
