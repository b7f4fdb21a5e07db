"""Launchers on the hosts of a test bed, and what the tests ask the bed's etcd."""

from __future__ import annotations

import os
import subprocess
import sys

from chaos.netbed import Host
from elastic.base.events import read_events
from tests.runtime.harness import REPO

LINEAR = os.path.join(REPO, "examples", "linear_regression.py")
TRAIN_ARGS = ["--max-steps", "40"]
FAST = ["--lease-ttl", "2", "--collective-timeout", "4", "--settle", "0.2"]
# Variables that would make a multi-host job form without the runtime's own
# address handling: the tests must pass with none of them set.
_BY_HAND = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "ELASTIC_ADVERTISE_HOST", "MASTER_ADDR")


def host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _BY_HAND}
    env["PYTHONPATH"] = REPO
    env["PYTHONUNBUFFERED"] = "1"
    return env


class HostLauncher:
    """``elastic run ... -n 1`` on one host of the bed."""

    def __init__(
        self,
        host: Host,
        workdir: str,
        *,
        job: str,
        etcd: str,
        extra: list[str] | None = None,
        train: bool = True,
        train_args: list[str] | None = None,
    ) -> None:
        self.host = host
        self.dir = os.path.join(workdir, f"h{host.index}")
        os.makedirs(self.dir, exist_ok=True)
        self.event_log = os.path.join(self.dir, "events.jsonl")
        self.out = os.path.join(self.dir, "final.pt")
        self.log_path = os.path.join(self.dir, "launcher.log")
        argv = [
            sys.executable,
            "-m",
            "elastic.cli",
            "run",
            "--job",
            job,
            "--etcd",
            etcd,
            "-n",
            "1",
            "--event-log",
            self.event_log,
            *FAST,
            *(extra or []),
            LINEAR,
            *(TRAIN_ARGS if train_args is None else train_args),
            "--out",
            self.out,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = host.run(
                argv, env=host_env(), cwd=self.dir, stdout=log, stderr=subprocess.STDOUT
            )

    def events(self) -> list[dict]:
        return read_events(self.event_log) if os.path.exists(self.event_log) else []

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f"--- host {self.host.index} ---\n" + f.read()[-n:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"launcher on host {self.host.index} still running after "
                f"{timeout}s:\n{self.log_tail()}"
            ) from None


def wait_members(host: Host, etcd: str, job: str, n: int, timeout: float) -> None:
    """Block until ``job`` has ``n`` member records, asked from inside ``host``."""
    proc = host.run(
        [sys.executable, "-m", "tests.multihost.probe", etcd, job, str(n), str(timeout)],
        env=host_env(),
        cwd=REPO,
    )
    assert proc.wait(timeout=timeout + 30) == 0, f"{job} did not reach {n} member(s)"
