"""Drive `elastic run` as a user would: real launcher, real workers, real etcd.

Waits poll the JSONL event log with a bound; nothing sleeps in place of
synchronisation. Every process a Job starts is ended by ``Job.close``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import torch

from elastic.base.events import read_events
from elastic.base.procutil import send_signal
from tests.helpers import procs
from tests.helpers.wait import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSIFIER = os.path.join(REPO, "examples", "classifier.py")

# Small and quick: 96 steps of 64 samples over 1.5 epochs of 4096 samples.
TRAIN_ARGS = ["--max-steps", "96", "--epochs", "2", "--step-time", "0.03"]
FAST = ["--lease-ttl", "2", "--collective-timeout", "4", "--settle", "0.2"]


class Job:
    def __init__(
        self,
        tmp_path: Any,
        *,
        nproc: int,
        etcd_url: str | None = None,
        job: str | None = None,
        extra: list[str] | None = None,
        script: str = CLASSIFIER,
        script_args: list[str] | None = None,
        out: str = "final.pt",
        name: str = "launcher",
    ) -> None:
        self.dir = str(tmp_path)
        os.makedirs(self.dir, exist_ok=True)
        self.job = job or f"t{uuid.uuid4().hex[:8]}"
        self.event_log = os.path.join(self.dir, f"{self.job}.events.jsonl")
        self.ledger_dir = os.path.join(self.dir, "ledger")
        self.out = os.path.join(self.dir, out)
        args = [
            sys.executable,
            "-m",
            "elastic.cli",
            "run",
            "-n",
            str(nproc),
            "--job",
            self.job,
            "--event-log",
            self.event_log,
            "--ledger-dir",
            self.ledger_dir,
            *FAST,
            *(extra or []),
        ]
        if etcd_url:
            args += ["--etcd", etcd_url]
        args += [
            script,
            *(script_args if script_args is not None else TRAIN_ARGS),
            "--out",
            self.out,
        ]
        self.log_path = os.path.join(self.dir, f"{name}-{self.job}.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdout=log, stderr=log, start_new_session=True
            )

    # -- observing ---------------------------------------------------------------

    def events(self) -> list[dict]:
        return read_events(self.event_log) if os.path.exists(self.event_log) else []

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]

    def wait_for(self, predicate: Callable[[list[dict]], Any], timeout: float, what: str) -> Any:
        def check() -> Any:
            if self.proc.poll() is not None:
                found = predicate(self.events())
                if found:
                    return found
                raise AssertionError(
                    f"launcher exited ({self.proc.returncode}) before {what}:\n" + self.log_tail()
                )
            return predicate(self.events())

        try:
            return wait_until(check, timeout, what, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- launcher log ---\n{self.log_tail()}") from None

    def wait_step(self, step: int, timeout: float = 90.0) -> None:
        self.wait_for(
            lambda evs: any(e["event"] == "step" and e["step"] >= step for e in evs),
            timeout,
            f"step {step}",
        )

    def world(self) -> list[str]:
        gens = [e for e in self.events() if e["event"] == "generation"]
        return gens[-1]["world"]

    def pid_of(self, member: str) -> int:
        spawns = [e for e in self.events() if e["event"] == "spawn" and e.get("member") == member]
        return spawns[-1]["pid"]

    def pid_of_rank(self, rank: int) -> int:
        return self.pid_of(self.world()[rank])

    def worker_pids(self) -> set[int]:
        return {e["pid"] for e in self.events() if e["event"] == "spawn" and "pid" in e}

    def wait_world_of(self, size: int, timeout: float = 60.0) -> dict:
        """The first generation event with ``size`` members."""
        return self.wait_for(
            lambda evs: [e for e in evs if e["event"] == "generation" and len(e["world"]) == size],
            timeout,
            f"a World of {size}",
        )[0]

    def freeze_until_evicted(self, member: str, timeout: float = 60.0) -> None:
        """SIGSTOP ``member`` until a World without it forms, then SIGCONT it."""
        pid = self.pid_of(member)
        os.kill(pid, signal.SIGSTOP)
        try:
            self.wait_for(
                lambda evs: [
                    e for e in evs if e["event"] == "generation" and member not in e["world"]
                ],
                timeout,
                f"a World without the frozen {member}",
            )
        finally:
            os.kill(pid, signal.SIGCONT)

    # -- ending ------------------------------------------------------------------

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"launcher still running after {timeout}s:\n" + self.log_tail()
            ) from None

    def kill_everything(self) -> None:
        """SIGKILL the launcher and every worker it started (a machine dying)."""
        pids = self.worker_pids()
        for pid in [self.proc.pid, *pids]:
            send_signal(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        wait_until(lambda: not any(procs.alive(p) for p in pids), 30, "workers to die")

    def close(self) -> None:
        left = {p for p in self.worker_pids() | {self.proc.pid} if procs.alive(p)}
        if left:
            procs.end(left)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def max_abs_diff(a_path: str, b_path: str) -> float:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a.keys() == b.keys()
    # Buffers such as an attention mask may hold -inf: compare finite entries.
    return max((a[k].double() - b[k].double()).nan_to_num(0.0).abs().max().item() for k in a)


def recovered_events(job: Job) -> list[dict]:
    return [e for e in job.events() if e["event"] == "recovered"]
