"""A multi-host test bed on one machine: network namespaces on a private bridge.

Each host is a network namespace with ``lo`` and one veth (``eth0`` inside)
whose other end is on a bridge this bed creates. Addresses exist only inside
the namespaces (a test subnet, 10.213.N.0/24); the bridge and the root ends
have none, so nothing a test sends can leave the bed. Names carry the owning
pid (``elmh<pid>...``): a bed whose owner died is recognised and removed by
the next one, and two live beds never touch each other's devices.

Root only; :func:`unavailable` says why a bed cannot be built here.

The multi-host tests and ``elastic chaos run --hosts N`` both build their hosts
with it.  A process that runs inside one of the namespaces (the chaos runner
does, on a control host of its own) reaches the bridge-side ends of the links
through ``Host.outside``: the network namespace the bed was made in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from elastic.base.procutil import alive, dying_with_parent, reap, send_signal
from elastic.coord.etcd import find_etcd_binary

PREFIX = "elmh"
SUBNET = "10.213.{net}.{host}"
_OWNED = re.compile(rf"^{PREFIX}(\d+)")
_CMD_TIMEOUT = 20.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=check
    )


def _no_ipv6(link: str) -> None:
    # Root-side devices would otherwise get link-local IPv6 addresses: keep
    # every address of the bed inside the namespaces.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # no IPv6 in this kernel: nothing to disable


def unavailable() -> str | None:
    """Why no bed can be built here (not root, no ``ip netns``), or None."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"`ip netns add` failed: {detail.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _netns_names() -> list[str]:
    out = _ip("-json", "netns", "list", check=False).stdout.strip()
    return [n["name"] for n in json.loads(out)] if out else []


def _link_names() -> list[str]:
    out = _ip("-json", "link", "show", check=False).stdout.strip()
    return [link["ifname"] for link in json.loads(out)] if out else []


def _kill_namespace_processes(netns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``netns`` (listed by the kernel, by pid)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()}
        if not pids:
            return
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                send_signal(pid, sig)
        reap(pids)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} in {netns} survived SIGKILL")
        time.sleep(0.05)


def clean_leftovers() -> None:
    """Remove namespaces and links of beds whose owning process is gone."""
    for name in _netns_names():
        m = _OWNED.match(name)
        if m and not alive(int(m[1])):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
    for name in _link_names():
        m = _OWNED.match(name)
        if m and not alive(int(m[1])):
            _ip("link", "del", name, check=False)


@dataclass
class Host:
    """One machine of the bed."""

    index: int
    netns: str
    veth: str  # the bridge-side end (in the root namespace)
    address: str
    # The network namespace file the bridge lives in, for a caller that runs
    # inside another namespace (None: the caller's own, where the bed was made).
    outside: str | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "netns": self.netns,
            "veth": self.veth,
            "address": self.address,
            "outside": self.outside,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Host:
        return cls(
            int(d["index"]),
            str(d["netns"]),
            str(d["veth"]),
            str(d["address"]),
            None if d.get("outside") is None else str(d["outside"]),
        )

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this host."""
        # A path: a wrapper that execs it (chaos.run) does not search PATH.
        return [shutil.which("ip") or "/sbin/ip", "netns", "exec", self.netns]

    def _bridge_side(self, *args: str) -> None:
        argv = ["ip", *args]
        if self.outside is not None:
            argv = ["nsenter", f"--net={self.outside}", *argv]
        subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=True)

    def run(
        self, argv: Sequence[str], env: dict[str, str] | None = None, **popen: object
    ) -> subprocess.Popen:
        """Start ``argv`` (``argv[0]`` a path) inside this host; it dies with the test."""
        proc = subprocess.Popen([*self.prefix(), *dying_with_parent(list(argv))], env=env, **popen)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def link_down(self) -> None:
        """Pull this host's cable: its peers see silence, not a refused connection."""
        self._bridge_side("link", "set", self.veth, "down")

    def link_up(self) -> None:
        self._bridge_side("link", "set", self.veth, "up")

    def kill_all(self) -> None:
        """SIGKILL everything running in this host (a machine dying)."""
        _kill_namespace_processes(self.netns)
        for proc in self.processes:
            try:
                proc.wait(timeout=_CMD_TIMEOUT)
            except subprocess.TimeoutExpired:  # outside the namespace already: by pid
                proc.kill()
                proc.wait(timeout=_CMD_TIMEOUT)


class TestBed:
    """``n`` hosts on one bridge; :meth:`destroy` removes everything, and may repeat."""

    __test__ = False  # not a pytest test class
    # Names carry only the pid (interface names are at most 15 characters), so
    # a process holds one bed at a time.
    _live: TestBed | None = None

    def __init__(self, n: int, net: int = 7) -> None:
        if not 1 <= n <= 200 or not 0 <= net <= 255:
            raise ValueError(f"bad test bed size {n} or net {net}")
        tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{tag}br"
        self._etcd_members: dict[int, tuple[list[str], str]] = {}
        self.hosts = [
            Host(i, f"{tag}-h{i}", f"{tag}v{i}", SUBNET.format(net=net, host=i + 1))
            for i in range(n)
        ]

    def create(self) -> TestBed:
        if TestBed._live is not None and TestBed._live is not self:
            raise RuntimeError("this process already holds a test bed; destroy it first")
        clean_leftovers()
        self.destroy()
        TestBed._live = self
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _no_ipv6(self.bridge)
            _ip("link", "set", self.bridge, "up")
            for h in self.hosts:
                _ip("netns", "add", h.netns)
                _ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
                _no_ipv6(h.veth)
                _ip("link", "set", h.veth, "master", self.bridge)
                _ip("link", "set", h.veth, "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
                _ip("-n", h.netns, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        existing = set(_netns_names())
        for h in self.hosts:
            if h.netns in existing:
                h.kill_all()
                _ip("netns", "del", h.netns, check=False)
        links = set(_link_names())
        for name in [h.veth for h in self.hosts] + [self.bridge]:
            if name in links:
                _ip("link", "del", name, check=False)
        if TestBed._live is self:
            TestBed._live = None

    def __enter__(self) -> TestBed:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- etcd on the bed ---------------------------------------------------------

    def etcd_single(self, data_dir: str, host: int = 0, timeout: float = 60.0) -> str:
        """``elastic etcd --listen`` inside one host; returns the URL it prints."""
        h = self.hosts[host]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log_path = os.path.join(data_dir, "etcd-cli.log")
        os.makedirs(data_dir, exist_ok=True)
        with open(log_path, "wb") as log:
            h.run(
                [
                    sys.executable,
                    "-m",
                    "elastic.cli",
                    "etcd",
                    "--listen",
                    h.address,
                    "--data-dir",
                    os.path.join(data_dir, "data"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                m = re.search(r"etcd listening on (\S+)", f.read())
            if m:
                return m[1]
            time.sleep(0.05)
        with open(log_path, encoding="utf-8", errors="replace") as f:
            raise AssertionError(f"etcd in {h.netns} did not start within {timeout}s: {f.read()}")

    def etcd_cluster(
        self, data_dir: str, timeout: float = 60.0
    ) -> tuple[str, list[subprocess.Popen]]:
        """One etcd member per host (the first three): the client URL list, the servers."""
        members = self.hosts[:3]
        binary = find_etcd_binary()
        cluster = ",".join(f"m{h.index}=http://{h.address}:2380" for h in members)
        servers = []
        for h in members:
            member_dir = os.path.join(data_dir, f"m{h.index}")
            os.makedirs(member_dir, exist_ok=True)
            with open(os.path.join(member_dir, "etcd.log"), "wb") as log:
                argv = [
                    binary,
                    "--name",
                    f"m{h.index}",
                    "--data-dir",
                    member_dir + "/data",
                    "--listen-client-urls",
                    f"http://{h.address}:2379",
                    "--advertise-client-urls",
                    f"http://{h.address}:2379",
                    "--listen-peer-urls",
                    f"http://{h.address}:2380",
                    "--initial-advertise-peer-urls",
                    f"http://{h.address}:2380",
                    "--initial-cluster",
                    cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    os.path.basename(data_dir),
                    "--log-level",
                    "warn",
                ]
                servers.append(h.run(argv, stdout=log, stderr=subprocess.STDOUT))
            self._etcd_members[h.index] = (argv, os.path.join(member_dir, "etcd.log"))
        urls = [f"http://{h.address}:2379" for h in members]
        self.wait_healthy(urls, timeout)
        return ",".join(urls), servers

    def restart_etcd_member(self, index: int) -> subprocess.Popen:
        """Start cluster member ``index`` again on its data dir (after a kill)."""
        argv, log_path = self._etcd_members[index]
        argv = [a if a != "new" else "existing" for a in argv]
        with open(log_path, "ab") as log:
            return self.hosts[index].run(argv, stdout=log, stderr=subprocess.STDOUT)

    def etcd_leader(self, urls: str, timeout: float = 30.0, host: int = 0) -> int:
        """Index (in ``urls``, comma-separated) of the cluster's current leader."""
        probe = (
            "import sys, etcd3\n"
            "for u in sys.argv[1].split(','):\n"
            "    h, p = u.split('//')[1].rsplit(':', 1)\n"
            "    try:\n"
            "        c = etcd3.client(host=h, port=int(p), timeout=5)\n"
            "        print(c.status().leader.client_urls[0]); sys.exit(0)\n"
            "    except Exception:\n"
            "        continue\n"
            "sys.exit(1)\n"
        )
        proc = self.hosts[host].run([sys.executable, "-c", probe, urls], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"no etcd member of {urls} named a leader")
        return urls.split(",").index(out.decode().strip())

    def wait_healthy(self, urls: Sequence[str], timeout: float, host: int = 0) -> None:
        """Wait until every etcd in ``urls`` reports healthy, probed from inside a host."""
        probe = (
            "import json, sys, time, urllib.request\n"
            "deadline = time.monotonic() + float(sys.argv[1])\n"
            "left = set(sys.argv[2:])\n"
            "while left and time.monotonic() < deadline:\n"
            "    for u in sorted(left):\n"
            "        try:\n"
            "            with urllib.request.urlopen(u + '/health', timeout=1) as r:\n"
            "                if json.loads(r.read()).get('health') == 'true':\n"
            "                    left.discard(u)\n"
            "        except (OSError, ValueError):\n"
            "            pass\n"
            "    time.sleep(0.1)\n"
            "sys.exit(1 if left else 0)\n"
        )
        proc = self.hosts[host].run([sys.executable, "-c", probe, str(timeout), *urls])
        rc = proc.wait(timeout=timeout + _CMD_TIMEOUT)
        if rc != 0:
            raise AssertionError(f"etcd at {list(urls)} not healthy within {timeout}s")
