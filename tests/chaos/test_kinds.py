"""Fault kinds and triggers as registered classes: lookup, expectations that can fail,
the workload's signal handlers, kill-host against real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from chaos import procs
from chaos.spec import KINDS, TRIGGERS, FaultKind, FaultSpec, Registry
from tests.helpers import procs as hprocs


class FakeRun:
    """The events a kind's expectation reads (a unit-test stand-in for chaos.run.Run)."""

    workers = 3

    def __init__(self, *events: dict[str, Any]) -> None:
        self._events = [{"t": 10.0, **e} for e in events]

    def current_events(self) -> list[dict[str, Any]]:
        return self._events

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self._events if e["event"] == name]

    def rendezvous_in_progress(self) -> bool:
        return False

    def joiner_ready(self) -> bool:
        return False


def _held(kind: str, record: dict[str, Any], run: FakeRun, **spec: Any) -> bool:
    checks = KINDS[kind].expect(FaultSpec(kind, **spec), {"t": 5.0, **record}, run)
    assert checks and all(c.name == kind for c in checks)
    return all(c.held for c in checks)


def test_every_kind_and_trigger_is_registered_once_by_its_name() -> None:
    assert {"kill-worker", "hang-worker", "freeze-worker", "kill-host", "leave", "join"} <= set(
        KINDS
    )
    assert set(TRIGGERS) == {
        "step",
        "checkpoint",
        "failure",
        "rendezvous",
        "full-world",
        "joiner-ready",
    }
    assert all(k.summary for k in KINDS.values())
    signals = [k.signal for k in KINDS.values() if k.signal is not None]
    assert len(signals) == len(set(signals)), signals
    with pytest.raises(ValueError, match="unknown fault kind 'nope'"):
        KINDS["nope"]


def test_a_kind_with_an_expectation_says_what_it_expects() -> None:
    # `elastic chaos list --kinds` (and docs/chaos.md through it) reads `expects`.
    checking = [k.name for k in KINDS.values() if type(k).expect is not FaultKind.expect]
    assert checking and all(KINDS[name].expects for name in checking), checking


def test_a_new_kind_is_one_registered_class() -> None:
    reg: Registry[FaultKind] = Registry("fault kind", __name__)

    @reg.register
    class Poke(FaultKind):
        name = "poke"

        def fire(self, spec: FaultSpec, target: Any, record: dict[str, Any]) -> bool:
            record["poked"] = True
            return True

    record: dict[str, Any] = {}
    assert reg["poke"].fire(FaultSpec("join"), None, record) and record == {"poked": True}
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(Poke)


def test_hang_expectation_needs_an_eviction_of_the_victim_and_its_kill() -> None:
    rec = {"member": "w-1"}
    evict = {"event": "evict", "members": ["w-1"]}
    killed = {"event": "evicted", "member": "w-1"}
    assert _held("hang-worker", rec, FakeRun(evict, killed), rank=1)
    assert not _held("hang-worker", rec, FakeRun(killed), rank=1)
    assert not _held(
        "hang-worker", rec, FakeRun({"event": "evict", "members": ["w-2"]}, killed), rank=1
    )


def test_leave_expectation_needs_its_leave_event_and_a_clean_exit() -> None:
    rec = {"member": "w-0"}
    left = {"event": "leave", "source": "w-0"}
    assert _held("leave", rec, FakeRun(left, {"event": "exit", "member": "w-0", "rc": 0}), rank=0)
    # Killed by the signal instead of leaving (and so restarted): not a graceful leave.
    assert not _held("leave", rec, FakeRun({"event": "exit", "member": "w-0", "rc": -15}), rank=0)


def test_freeze_expectation_fails_on_a_collective_time_out_while_frozen() -> None:
    rec = {"member": "w-2", "evicted": True, "stopped_s": 8.0}
    timed_out = {
        "event": "failure",
        "error": "[gloo] Timed out waiting 4000ms for recv",
        "error_type": "CollectiveTimeoutError",
    }
    # Judged by the type alone: a message that happens to say "timed out" is not one.
    abandoned = {
        "event": "failure",
        "error": "all_reduce abandoned: w-2's lease timed out",
        "error_type": "WorkerGroupError",
    }
    assert _held("freeze-worker", rec, FakeRun(), rank=2, duration_s=30.0)
    assert not _held("freeze-worker", rec, FakeRun(timed_out), rank=2, duration_s=30.0)
    assert _held("freeze-worker", rec, FakeRun(abandoned), rank=2, duration_s=30.0)
    assert not _held("freeze-worker", {**rec, "evicted": False}, FakeRun(), rank=2, duration_s=30.0)


def test_kill_host_and_kill_worker_expectations() -> None:
    rec = {"members": ["a-0", "a-1"]}
    still = {"event": "generation", "world": ["a-1", "b-0"]}
    without = {"event": "generation", "world": ["b-0", "b-1"]}
    assert _held("kill-host", rec, FakeRun(still, without), rank=0)
    assert not _held("kill-host", rec, FakeRun(still), rank=0)
    assert _held(
        "kill-worker",
        {"member": "b-0"},
        FakeRun({"event": "exit", "member": "b-0", "rc": -9}),
        rank=0,
    )
    assert not _held(
        "kill-worker",
        {"member": "b-0"},
        FakeRun({"event": "exit", "member": "b-0", "rc": 0}),
        rank=0,
    )


def test_link_down_expects_a_world_without_the_host_while_cut_and_its_return() -> None:
    rec = {"members": ["c-0"], "launcher": 77, "up_t": 12.0, "address": "10.213.8.3"}
    spawn = {"event": "spawn", "member": "c-0", "source": "launcher-77", "t": 1.0}

    def gen(t: float, world: list[str]) -> dict[str, Any]:
        return {"event": "generation", "world": world, "t": t}

    cut, back = gen(7.0, ["a-0", "b-0"]), gen(20.0, ["a-0", "b-0", "c-0"])
    assert _held("link-down", rec, FakeRun(spawn, cut, back), rank=2, duration_s=6.0)
    assert not _held("link-down", rec, FakeRun(spawn, back), rank=2, duration_s=6.0)
    assert not _held("link-down", rec, FakeRun(spawn, cut), rank=2, duration_s=6.0)
    # A World formed during the cut that still holds the host's worker is no eviction.
    assert not _held(
        "link-down", rec, FakeRun(spawn, gen(7.0, ["a-0", "c-0"]), back), rank=2, duration_s=6.0
    )


def test_etcd_leader_loss_expects_steps_while_it_is_down_and_none_redone() -> None:
    rec = {"leader": "http://10.0.0.1:2379", "down_s": 4.0}  # down from t=5 to t=9

    def step(t: float, n: int) -> dict[str, Any]:
        return {"event": "step", "step": n, "t": t}

    assert _held("kill-etcd-leader", rec, FakeRun(step(6, 11), step(7, 12), step(10, 13)))
    assert not _held("kill-etcd-leader", rec, FakeRun(step(10, 11), step(11, 12)))  # stalled
    assert not _held(
        "kill-etcd-leader", rec, FakeRun(step(6, 11), step(7, 12), step(8, 12))
    )  # step 12 redone


class _OneMember:
    """An etcd without members to kill one by one (``EmbeddedEtcd``'s shape)."""


def test_etcd_leader_loss_does_not_fire_on_a_single_member_etcd() -> None:
    target = type("T", (), {"etcd": _OneMember()})()
    record: dict[str, Any] = {}
    assert not KINDS["kill-etcd-leader"].fire(FaultSpec("kill-etcd-leader"), target, record)
    assert "one member" in record["detail"]


def test_the_workload_installs_a_handler_for_each_in_worker_kind() -> None:
    code = (
        "import signal\n"
        "from chaos.faults import WorkerFaults\n"
        "from chaos.workload import _Chaos\n"
        "_Chaos(WorkerFaults()).install()\n"
        "print(sorted(int(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPWR)\n"
        "      if callable(signal.getsignal(s))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    wanted = sorted(int(KINDS[k].signal) for k in ("step-exception", "slow-rank", "hang-worker"))
    assert json.loads(out.stdout) == wanted


_FAKE_LAUNCHER = (
    "import subprocess, sys, time\n"
    "kids = [subprocess.Popen(['/bin/sleep', '60']) for _ in range(2)]\n"
    "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
    "time.sleep(60)\n"
)


class FakeTarget:
    etcd = None

    def __init__(self, token: str, launcher: int, workers: list[int]) -> None:
        self.token, self.launcher, self.pids = token, launcher, workers

    def worker(self, rank: int) -> tuple[str, int] | None:
        return f"m-{rank}", self.pids[rank]

    def launchers_running(self) -> list[int]:
        return [self.launcher, os.getpid()]  # another "host" runs

    def spawned_by(self, launcher_pid: int) -> list[tuple[str, int]]:
        return [(f"m-{i}", p) for i, p in enumerate(self.pids)]


def test_kill_host_of_the_only_launcher_does_not_fire_and_says_why() -> None:
    # The "worker" is this process; its launcher (our parent) is the only one running.
    target = FakeTarget("no-such-token", os.getppid(), [os.getpid()])
    target.launchers_running = lambda: [os.getppid()]  # type: ignore[method-assign]
    record: dict[str, Any] = {}
    assert not KINDS["kill-host"].fire(FaultSpec("kill-host", rank=0), target, record)
    assert record["detail"] == "only one launcher runs: killing it would end the job"


def test_kill_host_kills_the_launcher_and_every_worker_it_started() -> None:
    token = f"kill-host-{os.getpid()}"
    env = dict(os.environ, **{procs.TOKEN_ENV: token})
    launcher = subprocess.Popen(
        [sys.executable, "-c", _FAKE_LAUNCHER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert launcher.stdout is not None
        workers = [int(p) for p in launcher.stdout.readline().split()]
        target = FakeTarget(token, launcher.pid, workers)
        record: dict[str, Any] = {}
        assert KINDS["kill-host"].fire(FaultSpec("kill-host", rank=1), target, record)
        assert launcher.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(procs.alive(p) for p in workers):
            assert time.monotonic() < deadline, "a worker of the killed host survived"
            time.sleep(0.05)
        assert record["launchers_killed"] == [launcher.pid]
        assert sorted(record["members"]) == ["m-0", "m-1"]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        hprocs.end({p for p in procs.processes_with_token(token)})
