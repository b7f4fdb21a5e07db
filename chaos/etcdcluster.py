"""An etcd cluster of ``size`` members on one address, for runs that kill its leader.

``elastic.coord.etcd.EmbeddedEtcd`` runs one member; this starts ``size`` etcd
processes (the binary ``elastic.coord.etcd`` would use) on free ports of ``host``,
each with its own data dir, says which one leads, and kills, pauses and
restarts single members or all of them.  The whole-cluster methods have the
names and meaning of ``EmbeddedEtcd``'s (``kill``, ``restart``, ``pause``,
``resume``, ``start``, ``stop``, ``process``), so a chaos run and its etcd
fault kinds drive either without asking which it has.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

from elastic.base.procutil import dying_with_parent
from elastic.coord.etcd import connect, find_etcd_binary, free_port, join_hostport


class ClusterError(RuntimeError):
    """The cluster did not start, or named no leader."""


@dataclass
class Member:
    url: str
    argv: list[str]
    log: str
    process: subprocess.Popen | None = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class EtcdCluster:
    data_dir: str
    size: int = 3
    host: str = "127.0.0.1"
    binary: str | None = None
    start_timeout: float = 60.0
    members: list[Member] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.size < 1 or self.start_timeout <= 0:
            raise ValueError(f"bad cluster size {self.size} or timeout {self.start_timeout}")

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def url(self) -> str:
        """The client URL list ``elastic run --etcd`` takes."""
        return ",".join(self.urls)

    @property
    def process(self) -> subprocess.Popen | None:
        """A running member's process; None when every member is down."""
        return next((m.process for m in self.members if m.running()), None)

    # -- the whole cluster --------------------------------------------------------

    def start(self) -> EtcdCluster:
        """Start the cluster, or the members of a started one that are down; wait
        until every member is healthy."""
        if not self.members:
            self._plan()
        try:
            for m in self.members:
                if not m.running():
                    self._spawn(m)
            self._wait_healthy(self.members)
        except BaseException:
            self.stop()
            raise
        return self

    def _plan(self) -> None:
        binary = find_etcd_binary(self.binary)
        ports = [(free_port(self.host), free_port(self.host)) for _ in range(self.size)]
        peers = [f"http://{join_hostport(self.host, peer)}" for _, peer in ports]
        cluster = ",".join(f"m{i}={p}" for i, p in enumerate(peers))
        token = f"chaos-{os.getpid()}-{ports[0][0]}"  # the same for every member
        for i, ((client, _), peer) in enumerate(zip(ports, peers, strict=True)):
            member_dir = os.path.join(self.data_dir, f"m{i}")
            os.makedirs(member_dir, exist_ok=True)
            url = f"http://{join_hostport(self.host, client)}"
            # On a restart etcd reads the membership from its data dir and
            # ignores the --initial-* flags: the same argv serves both.
            argv = [
                binary,
                "--name",
                f"m{i}",
                "--data-dir",
                os.path.join(member_dir, "data"),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                token,
                "--log-level",
                "warn",
            ]
            self.members.append(Member(url, argv, os.path.join(member_dir, "etcd.log")))

    def _spawn(self, m: Member) -> None:
        with open(m.log, "ab") as log:
            m.process = subprocess.Popen(
                dying_with_parent(m.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_healthy(self, members: list[Member]) -> None:
        deadline = time.monotonic() + self.start_timeout
        left = {m.url for m in members}
        while left:
            for url in sorted(left):
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                        if json.loads(resp.read()).get("health") == "true":
                            left.discard(url)
                except (OSError, ValueError):
                    pass  # not up yet
            if left and time.monotonic() > deadline:
                raise ClusterError(
                    f"etcd members {sorted(left)} not healthy within "
                    f"{self.start_timeout}s (logs in {self.data_dir})"
                )
            time.sleep(0.1)  # polling a health endpoint; bounded by the deadline

    def kill(self) -> None:
        """SIGKILL every member, keeping data dirs and ports (a crash of all)."""
        for m in self.members:
            self.kill_member(m.url)

    def restart(self) -> EtcdCluster:
        return self.start()

    def pause(self) -> None:
        for m in self.members:
            if m.running():
                os.kill(m.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        for m in self.members:
            if m.running():
                os.kill(m.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        for m in self.members:
            self.kill_member(m.url)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one member ---------------------------------------------------------------

    def member(self, url: str) -> Member:
        for m in self.members:
            if m.url == url:
                return m
        raise ValueError(f"{url} is not a member of {self.urls}")

    def leader(self, timeout: float = 10.0) -> str:
        """Client URL of the current leader, as a live member reports it."""
        deadline = time.monotonic() + timeout
        last = "no member answered"
        while True:
            for m in self.members:
                if not m.running():
                    continue
                try:
                    client = connect(m.url)
                    try:
                        status = client.status()
                    finally:
                        client.close()
                except Exception as exc:  # a member without quorum: ask the next one
                    last = repr(exc)
                    continue
                urls = [
                    u
                    for u in (status.leader.client_urls if status.leader else [])
                    if u in self.urls
                ]
                if urls:
                    return urls[0]
                last = "the cluster reports no leader"
            if time.monotonic() > deadline:
                raise ClusterError(f"no leader of {self.urls} within {timeout}s: {last}")
            time.sleep(0.1)  # an election in progress; bounded by the deadline

    def kill_member(self, url: str) -> None:
        m = self.member(url)
        if m.process is None:
            return
        if m.process.poll() is None:
            os.kill(m.process.pid, signal.SIGCONT)  # a paused member must see the kill
            m.process.send_signal(signal.SIGKILL)
        try:
            m.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # killed: the kernel reaps it with this process
        m.process = None

    def restart_member(self, url: str) -> None:
        """Start a killed member again on its data dir; wait until it is healthy."""
        m = self.member(url)
        if not m.running():
            self._spawn(m)
        self._wait_healthy([m])
