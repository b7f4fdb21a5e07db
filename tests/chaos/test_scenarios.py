"""Scenarios: enough of them, valid, and each schedule reproducible from its seed."""

from __future__ import annotations

import json

import pytest

from chaos import faults
from chaos import scenarios as sc

REQUIRED_FAULTS = {
    "kill-worker",
    "pause-worker",
    "step-exception",
    "slow-rank",
    "kill-etcd",
    "pause-etcd",
    "join",
    "kill-all-resume",
    "hang-worker",
    "freeze-worker",
    "kill-host",
    "leave",
}
STORAGE_ACTIONS = {"fail", "delay", "truncate", "bitflip"}


def test_there_are_at_least_twenty_named_scenarios_and_a_smoke_subset_of_five() -> None:
    assert len(sc.SCENARIOS) >= 20
    assert len(sc.smoke()) >= 5
    assert all(name == s.name for name, s in sc.SCENARIOS.items())


@pytest.mark.parametrize("name", sorted(sc.SCENARIOS))
def test_schedule_is_reproducible_from_its_seed(name: str) -> None:
    scenario = sc.SCENARIOS[name]
    for seed in range(5):
        a, b = scenario.schedule(seed), scenario.schedule(seed)
        assert json.dumps(a.to_json()) == json.dumps(b.to_json())


@pytest.mark.parametrize("name", sorted(sc.SCENARIOS))
def test_schedule_fits_the_run(name: str) -> None:
    scenario = sc.SCENARIOS[name]
    total = scenario.train.total_steps
    for seed in range(10):
        sched = scenario.schedule(seed)
        for f in sched.faults:
            assert f.at_step < total, f.describe()
            if f.rank is not None:
                assert f.rank < scenario.workers
        for f in sched.storage:
            assert f.step is None or 0 < f.step < total
        if scenario.expect and sc.EXPECT_DAMAGE_DETECTED in scenario.expect:
            kill = [f for f in sched.faults if f.kind == "kill-all-resume"][0]
            assert all(kill.at_step > s for s in sched.corrupted_on_purpose)


def test_seeds_draw_different_schedules() -> None:
    varied = [
        name
        for name, s in sc.SCENARIOS.items()
        if len({json.dumps(s.schedule(seed).to_json()) for seed in range(5)}) > 1
    ]
    # Every scenario with a free choice uses the seed (only the fault-free one has none).
    assert set(sc.SCENARIOS) - set(varied) <= {"checkpoint-on-last-step"}


def test_the_scenarios_cover_every_fault_of_the_issue() -> None:
    kinds = {
        f.kind for s in sc.SCENARIOS.values() for seed in range(3) for f in s.schedule(seed).faults
    }
    assert REQUIRED_FAULTS <= kinds
    actions = {f.action for s in sc.SCENARIOS.values() for f in s.schedule(0).storage}
    assert STORAGE_ACTIONS <= actions
    assert any(f.permanent for s in sc.SCENARIOS.values() for f in s.schedule(0).storage)
    targeted_rank0 = {
        f.kind
        for s in sc.SCENARIOS.values()
        for seed in range(3)
        for f in s.schedule(seed).faults
        if f.rank == 0
    }
    assert {"kill-worker", "pause-worker"} <= targeted_rank0


def test_unknown_scenario_lookup_names_it() -> None:
    with pytest.raises(KeyError, match="'nope'"):
        sc.get("nope")


def test_bad_fault_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a target rank"):
        faults.FaultSpec("kill-worker", 3)
    with pytest.raises(ValueError, match="unknown fault kind 'explode'"):
        faults.FaultSpec("explode", 3)
    with pytest.raises(ValueError, match="unknown trigger 'whenever'"):
        faults.FaultSpec("kill-etcd", 3, on="whenever")
    with pytest.raises(ValueError, match="freeze-worker needs duration_s > 0"):
        faults.FaultSpec("freeze-worker", 3, rank=0)
    with pytest.raises(ValueError, match="only a fail fault can be permanent"):
        faults.StorageFault("delay", path="step-*", delay_s=1.0, permanent=True)
    with pytest.raises(ValueError, match="unknown expectation 'nope'"):
        sc.Scenario("x", "x", sc.SCENARIOS["leave"].draw, expect=("nope",))
    with pytest.raises(ValueError, match="launchers must be in 1..workers"):
        sc.Scenario("x", "x", sc.SCENARIOS["leave"].draw, workers=2, launchers=3)


def test_worker_faults_round_trip_through_the_environment() -> None:
    sched = sc.SCENARIOS["storage-transient"].schedule(2)
    wf = faults.WorkerFaults(
        storage=sched.storage, seed=2, slow_step_s=1.5, slow_steps=3, record_dir="/tmp/x"
    )
    assert faults.WorkerFaults.from_env(wf.to_env()) == wf
    assert faults.WorkerFaults.from_env({}) == faults.WorkerFaults()
    plan = wf.fault_plan("/data/ckpt")
    assert all(f.path.startswith("/data/ckpt/step-") for f in plan.faults)
