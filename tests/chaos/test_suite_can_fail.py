"""The suite can fail: a deliberately broken component plugged into a real scenario is
reported as exactly the invariant it breaks.

Each broken component lives in chaos/workload.py (``--break``), outside the
product code: a sampler that does not re-split after a World change, a store
that publishes the manifest before the data, a commit fence that skips the
generation compare, and a worker that never exits.
"""

from __future__ import annotations

import pytest

from chaos import invariants as inv
from chaos import scenarios as sc
from chaos.faults import FaultSpec, StorageFault, shard_glob
from chaos.run import RunPlan
from tests.chaos.conftest import explain, run_plan


def _failed(result) -> dict[str, str]:
    return {c.name: c.detail for c in result.checks if not c.held}


def test_sampler_that_does_not_reshard_breaks_exactly_once_and_params(
    chaos_reference, tmp_path
) -> None:
    scenario = sc.get("kill-worker")
    plan = RunPlan("kill-worker", 0, scenario, scenario.schedule(0), breaks=("sampler",))
    result = run_plan(plan, chaos_reference, str(tmp_path / "run"))
    failed = _failed(result)
    assert inv.EXACTLY_ONCE in failed, explain(result)
    assert "never seen" in failed[inv.EXACTLY_ONCE]
    assert inv.PARAMS in failed
    # The rest of the job was fine: the report points at the broken part only.
    assert set(failed) == {inv.EXACTLY_ONCE, inv.PARAMS}, explain(result)


# Slow suite (CI's time budget); the fast suite covers this path in
# the sampler case above (the suite failing a broken build).
@pytest.mark.slow
def test_store_that_writes_the_manifest_first_leaves_a_torn_checkpoint(
    chaos_reference, tmp_path
) -> None:
    scenario = sc.get("kill-during-save")
    ckpt = scenario.shape.checkpoints[1]
    # Rank 0 commits; its slow shard write keeps it inside the save when it is killed.
    schedule = sc.Schedule(
        (FaultSpec("kill-worker", ckpt, on="checkpoint", rank=0, delay_s=0.4),),
        storage=(
            StorageFault(
                "delay",
                path=shard_glob(ckpt, 0),
                ops=("write",),
                times=None,
                delay_s=1.5,
                step=ckpt,
            ),
        ),
    )
    plan = RunPlan("kill-during-save", 0, scenario, schedule, breaks=("store",))
    result = run_plan(plan, chaos_reference, str(tmp_path / "run"))
    failed = _failed(result)
    assert inv.CHECKPOINTS in failed, explain(result)
    assert f"committed step {ckpt} does not verify" in failed[inv.CHECKPOINTS]
    assert inv.PARAMS not in failed and inv.EXACTLY_ONCE not in failed, explain(result)


# Slow suite (CI's time budget); the fast suite covers this path in
# the sampler case above (the suite failing a broken build).
@pytest.mark.slow
def test_fence_without_generation_compare_accepts_a_zombies_commit(
    chaos_reference, tmp_path
) -> None:
    scenario = sc.get("zombie-rank0-during-save")
    plan = RunPlan(scenario.name, 0, scenario, scenario.schedule(0), breaks=("fence",))
    result = run_plan(plan, chaos_reference, str(tmp_path / "run"))
    failed = _failed(result)
    assert inv.FENCING in failed, explain(result)
    assert "accepted while generation" in failed[inv.FENCING]


# Slow suite (CI's time budget); the fast suite covers this path in
# the sampler case above (the suite failing a broken build).
@pytest.mark.slow
def test_a_worker_that_never_exits_is_reported_as_a_hang(chaos_reference, tmp_path) -> None:
    scenario = sc.get("kill-worker")
    plan = RunPlan(
        "no-faults",
        0,
        scenario,
        sc.Schedule(),
        breaks=("hang",),
        bound_s=max(35.0, 1.6 * chaos_reference.result.wall_s),
    )
    result = run_plan(plan, chaos_reference, str(tmp_path / "run"))
    failed = _failed(result)
    assert set(failed) == {inv.NO_HANG}, explain(result)
    assert "stopped by the runner" in failed[inv.NO_HANG]
    # (the autouse hygiene fixture fails the test if anything of the run survived)
