"""Fault kinds and triggers as registered classes: lookup, expectations that can fail,
the workload's signal handlers, kill-host and freeze-host against real processes
(freeze-host also in a real run)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chaos import procs
from chaos import scenarios as sc
from chaos.run import Reference, RunPlan
from chaos.spec import KINDS, TRIGGERS, FaultKind, FaultSpec, Registry
from tests.chaos.conftest import SETTINGS, explain, run_plan
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


@contextlib.contextmanager
def _fake_host(name: str) -> Iterator[tuple[subprocess.Popen, FakeTarget]]:
    """A stand-in launcher and its two workers, all carrying a run token; whatever is
    left of them is ended afterwards (also when stopped)."""
    token = f"{name}-{os.getpid()}"
    env = dict(os.environ, **{procs.TOKEN_ENV: token})
    launcher = subprocess.Popen(
        [sys.executable, "-c", _FAKE_LAUNCHER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert launcher.stdout is not None
        workers = [int(p) for p in launcher.stdout.readline().split()]
        yield launcher, FakeTarget(token, launcher.pid, workers)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        hprocs.end({p for p in procs.processes_with_token(token)})


def test_kill_host_kills_the_launcher_and_every_worker_it_started() -> None:
    with _fake_host("kill-host") as (launcher, target):
        record: dict[str, Any] = {}
        assert KINDS["kill-host"].fire(FaultSpec("kill-host", rank=1), target, record)
        assert launcher.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(procs.alive(p) for p in target.pids):
            left = [p for p in target.pids if procs.alive(p)]
            assert time.monotonic() < deadline, (
                f"worker(s) {left} of the killed host survived; the fault killed "
                f"{record.get('workers_killed')}, token kept by "
                f"{[p for p in left if procs.belongs(p, target.token)]}, parents "
                f"{[procs.parent(p) for p in left]}"
            )
            time.sleep(0.05)
        assert record["workers_killed"] == sorted(target.pids)
        assert record["launchers_killed"] == [launcher.pid]
        assert sorted(record["members"]) == ["m-0", "m-1"]


# -- freeze-host ----------------------------------------------------------------------


def _state(pid: int) -> str:
    """The process state letter of /proc/PID/stat ("T": stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rfind(")") + 2]


def test_freeze_host_needs_a_rank_and_a_duration_and_says_what_it_freezes() -> None:
    with pytest.raises(ValueError, match=r"needs duration_s > 0 \(how long the host stays"):
        FaultSpec("freeze-host", 10, rank=1)
    with pytest.raises(ValueError, match="needs a target rank"):
        FaultSpec("freeze-host", 10, duration_s=6.0)
    assert (
        FaultSpec("freeze-host", 10, rank=1, duration_s=6.0).describe()
        == "freeze-host rank 1 at step 10 for 6s (its launcher and all of its workers)"
    )


def test_freeze_host_stops_the_launcher_and_its_workers_then_wakes_them() -> None:
    with _fake_host("freeze-host") as (launcher, target):
        everyone = [launcher.pid, *target.pids]
        record: dict[str, Any] = {"t": time.time()}
        spec = FaultSpec("freeze-host", rank=1, duration_s=1.5)
        firing = threading.Thread(
            target=lambda: record.update(fired=KINDS["freeze-host"].fire(spec, target, record))
        )
        firing.start()
        deadline = time.monotonic() + 1.2
        while {_state(p) for p in everyone} != {"T"}:
            assert time.monotonic() < deadline, [_state(p) for p in everyone]
            time.sleep(0.02)
        firing.join(10)
        assert record["fired"], record
        assert "T" not in {_state(p) for p in everyone}, "a process of the host stayed stopped"
        assert record["launcher"] == launcher.pid and sorted(record["members"]) == ["m-0", "m-1"]
        assert 1.5 <= record["frozen_s"] < 5 and record["thaw_t"] > record["t"]


def test_freeze_host_of_the_only_launcher_does_not_fire() -> None:
    target = FakeTarget("no-such-token", os.getppid(), [os.getpid()])
    target.launchers_running = lambda: [os.getppid()]  # type: ignore[method-assign]
    record: dict[str, Any] = {}
    spec = FaultSpec("freeze-host", rank=0, duration_s=1.0)
    assert not KINDS["freeze-host"].fire(spec, target, record)
    assert record["detail"] == "only one launcher runs: freezing it pauses the job"


def test_freeze_host_expects_a_world_without_it_its_workers_out_and_back() -> None:
    rec = {"members": ["a-0", "a-1"], "launcher": 41, "thaw_t": 12.0, "frozen_s": 6.0}  # t=5

    def gen(t: float, g: int, world: list[str]) -> dict[str, Any]:
        return {"event": "generation", "t": t, "gen": g, "step": 20, "world": world}

    def out(t: float, member: str) -> dict[str, Any]:
        return {"event": "rejoin", "t": t, "gen": 1, "source": member}

    spawns = [
        {"event": "spawn", "member": m, "source": "launcher-41", "t": 1.0} for m in rec["members"]
    ]
    first = gen(1.0, 1, ["a-0", "b-0", "a-1", "b-1"])
    without = gen(8.0, 2, ["b-0", "b-1"])
    failed = {"event": "failure", "t": 12.1, "gen": 1, "source": "a-1", "error_type": "X"}
    back = gen(14.0, 3, ["b-0", "b-1", "a-0", "a-1"])
    ok = [*spawns, first, without, out(12.2, "a-0"), failed, back]
    assert _held("freeze-host", rec, FakeRun(*ok), rank=0, duration_s=6.0)
    # An old World that trained on a step after waking is reported, not failed.
    late = {"event": "step", "t": 12.05, "gen": 1, "step": 21}
    checks = KINDS["freeze-host"].expect(
        FaultSpec("freeze-host", rank=0, duration_s=6.0), {"t": 5.0, **rec}, FakeRun(*ok, late)
    )
    assert checks[0].held and "1 more step(s)" in checks[0].detail
    # No World without the host while it was frozen (one formed after it woke).
    after = gen(13.0, 2, ["b-0", "b-1"])
    early = [*spawns, first, after, out(12.2, "a-0"), failed, back]
    assert not _held("freeze-host", rec, FakeRun(*early), rank=0, duration_s=6.0)
    # A woken worker that never found itself out of the old World.
    unaware = [*spawns, first, without, out(12.2, "a-0"), back]
    assert not _held("freeze-host", rec, FakeRun(*unaware), rank=0, duration_s=6.0)
    # The host's workers never came back.
    assert not _held("freeze-host", rec, FakeRun(*ok[:-1]), rank=0, duration_s=6.0)


# Slow suite (CI's time budget); the fast suite covers this path in
# the freeze-host unit tests above and link-down in tests/multihost.
@pytest.mark.slow
def test_a_frozen_host_is_left_behind_and_fenced_out_when_it_wakes(
    chaos_reference: Reference, tmp_path: Any
) -> None:
    # 4 workers on 2 launchers; once all 4 train, the host of rank 0 (the leader) is
    # frozen for the lease TTL + 4 s under a collective timeout far above it: the
    # others re-form once the leases lapse, the woken workers find themselves out
    # and rejoin, and every invariant holds.
    scenario = sc.Scenario(
        "freeze-host",
        "freeze the host of rank 0",
        lambda rng, shape: sc.Schedule(),
        workers=4,
        launchers=2,
        step_time=0.3,
        collective_timeout=60.0,
    )
    spec = FaultSpec(
        "freeze-host", on="full-world", rank=0, delay_s=1.0, duration_s=SETTINGS.lease_ttl + 4.0
    )
    plan = RunPlan("freeze-host", 0, scenario, sc.Schedule((spec,)))
    result = run_plan(plan, chaos_reference, str(tmp_path / "run"))
    assert result.passed, explain(result)
    (fault,) = result.faults
    assert fault["fired"] and len(fault["members"]) == 2, fault
