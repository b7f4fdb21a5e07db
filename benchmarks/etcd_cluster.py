"""A 3-member etcd cluster on loopback, for benchmarks that kill its leader.

``EmbeddedEtcd`` runs one member only; this starts ``size`` etcd processes
(the binary ``elastic.etcd`` would use) on free loopback ports, each with its
own data dir, and says which one leads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

from elastic.etcd import connect, find_etcd_binary, free_port
from elastic.procutil import dying_with_parent


@dataclass
class LoopbackCluster:
    data_dir: str
    size: int = 3
    start_timeout: float = 60.0
    servers: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.size < 1 or self.start_timeout <= 0:
            raise ValueError(f"bad cluster size {self.size} or timeout {self.start_timeout}")

    @property
    def urls(self) -> list[str]:
        return list(self.servers)

    @property
    def url(self) -> str:
        """The client URL list ``elastic run --etcd`` takes."""
        return ",".join(self.servers)

    def start(self) -> LoopbackCluster:
        binary = find_etcd_binary()
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        token = f"bench-{os.getpid()}-{ports[0][0]}"  # the same for every member
        try:
            for i, (client, peer) in enumerate(ports):
                member_dir = os.path.join(self.data_dir, f"m{i}")
                os.makedirs(member_dir, exist_ok=True)
                url = f"http://127.0.0.1:{client}"
                argv = [binary, "--name", f"m{i}", "--data-dir", os.path.join(member_dir, "data"),
                        "--listen-client-urls", url, "--advertise-client-urls", url,
                        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                        "--initial-cluster", cluster, "--initial-cluster-state", "new",
                        "--initial-cluster-token", token,
                        "--log-level", "warn"]
                with open(os.path.join(member_dir, "etcd.log"), "wb") as log:
                    self.servers[url] = subprocess.Popen(
                        dying_with_parent(argv), stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        left = set(self.servers)
        while left:
            for url in sorted(left):
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                        if json.loads(resp.read()).get("health") == "true":
                            left.discard(url)
                except (OSError, ValueError):
                    pass  # not up yet
            if left and time.monotonic() > deadline:
                raise RuntimeError(f"etcd members {sorted(left)} not healthy within "
                                   f"{self.start_timeout}s (logs in {self.data_dir})")
            time.sleep(0.1)  # polling a health endpoint; bounded by the deadline

    def leader(self) -> str:
        """Client URL of the current leader, as a live member reports it."""
        client = connect(self.url)
        try:
            status = client.status()
        finally:
            client.close()
        if status.leader is None:
            raise RuntimeError("the cluster reports no leader")
        urls = [u for u in status.leader.client_urls if u in self.servers]
        if not urls:
            raise RuntimeError(f"leader {status.leader.client_urls} is none of {self.urls}")
        return urls[0]

    def kill(self, url: str) -> None:
        proc = self.servers[url]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # killed: the kernel reaps it with this process

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
