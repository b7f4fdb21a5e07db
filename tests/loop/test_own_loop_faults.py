"""examples/own_loop.py through the rest of a fleet's changes: a frozen worker,
a join, a graceful leave, every worker killed and the job resumed.

Each run ends bitwise equal to the script run alone (``--exact``): parameters,
the learning rate at every step, every evaluation's metrics; training and
validation samples each exactly once. Real launcher, real workers, real etcd.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.loop.reference import ARGS, OWN_LOOP, assert_matches
from tests.runtime.harness import Job


def _own_loop(tmp_path, etcd_url, log, **kw) -> Job:
    return Job(
        tmp_path,
        etcd_url=etcd_url,
        script=OWN_LOOP,
        script_args=[*ARGS, "--metrics", log, *kw.pop("script_args", [])],
        **kw,
    )


# Slow suite (CI's time budget); the fast suite covers this path in
# tests/runtime/test_failures.py (the same step protocol).
@pytest.mark.slow
def test_a_worker_frozen_past_its_lease_is_evicted_and_the_result_is_the_same(
    tmp_path, etcd_url, jobs, alone
):
    log = str(tmp_path / "metrics.jsonl")
    job = _own_loop(tmp_path, etcd_url, log, nproc=3)
    jobs.append(job)
    job.wait_step(15)
    job.freeze_until_evicted(job.world()[1])
    assert job.wait(240) == 0, job.log_tail()
    assert_matches(alone, job.out, log, job.ledger_dir)


# Slow suite (CI's time budget); the fast suite covers this path in
# tests/runtime/test_failures.py (the same step protocol).
@pytest.mark.slow
def test_a_worker_joining_trains_on_from_its_peers_state(tmp_path, etcd_url, jobs, alone):
    log = str(tmp_path / "metrics.jsonl")
    # Slower steps: the joiner needs seconds to import torch and reach the job.
    slow = ["--step-time", "0.15"]
    job = _own_loop(tmp_path, etcd_url, log, nproc=2, script_args=slow)
    jobs.append(job)
    job.wait_step(5)
    joiner = _own_loop(
        tmp_path,
        etcd_url,
        log,
        nproc=1,
        job=job.job,
        name="joiner",
        out="joiner.pt",
        script_args=slow,
    )
    jobs.append(joiner)
    grown = job.wait_world_of(3, 90)
    assert grown["src"] is not None, "the joiner must receive state from a peer"
    assert grown["live"], "the World trains on while the joiner receives"
    assert job.wait(240) == 0, job.log_tail()
    assert joiner.wait(60) == 0, joiner.log_tail()
    assert_matches(alone, job.out, log, job.ledger_dir)
    assert_matches(alone, joiner.out, log, job.ledger_dir)  # the joiner's own copy too


def test_a_graceful_leave_is_not_a_failure_and_the_result_is_the_same(
    tmp_path, etcd_url, jobs, alone
):
    log = str(tmp_path / "metrics.jsonl")
    job = _own_loop(tmp_path, etcd_url, log, nproc=3)
    jobs.append(job)
    job.wait_step(15)
    leaver = job.world()[2]
    os.kill(job.pid_of(leaver), signal.SIGTERM)
    job.wait_for(lambda evs: [e for e in evs if e["event"] == "leave"], 30, "the leave")
    assert job.wait(240) == 0, job.log_tail()
    exits = {e["member"]: e["rc"] for e in job.events() if e["event"] == "exit"}
    assert exits[leaver] == 0
    assert not [e for e in job.events() if e["event"] == "failure"], job.log_tail()
    assert_matches(alone, job.out, log, job.ledger_dir)


def _merge_ledgers(first: str, second: str, restored: int, into: str) -> None:
    """One ledger of the two runs: the first run's steps before the restored
    checkpoint (its evaluations up to it), then everything the resumed run did."""
    os.makedirs(into)
    for name in os.listdir(first):
        with open(os.path.join(first, name), encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.endswith("\n")]
        keep = [
            r
            for r in recs
            if r["step"] < restored or (name.startswith("valledger") and r["step"] <= restored)
        ]
        prefix, _, member = name.partition("-")
        with open(os.path.join(into, f"{prefix}-first-{member}"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
    for name in os.listdir(second):
        with open(os.path.join(second, name), encoding="utf-8") as src:
            prefix, _, member = name.partition("-")
            with open(os.path.join(into, f"{prefix}-second-{member}"), "w") as dst:
                dst.write(src.read())


# Slow suite (CI's time budget); the fast suite covers this path in
# tests/runtime/test_failures.py (the same step protocol).
@pytest.mark.slow
def test_every_worker_killed_then_resume_ends_as_the_run_alone(tmp_path, etcd_url, jobs, alone):
    log = str(tmp_path / "metrics.jsonl")
    ck = ["--checkpoint", f"file://{tmp_path}/ck", "--checkpoint-every", "10"]
    first = _own_loop(tmp_path / "a", etcd_url, log, nproc=2, extra=ck)
    jobs.append(first)
    first.wait_for(
        lambda evs: [e for e in evs if e["event"] == "checkpoint_committed" and e["step"] >= 20],
        120,
        "checkpoint 20 committed",
    )
    first.wait_step(24)  # past the evaluation at step 20, short of checkpoint 30
    first.kill_everything()
    resumed = _own_loop(tmp_path / "b", etcd_url, log, nproc=3, extra=[*ck, "--resume"])
    jobs.append(resumed)
    assert resumed.wait(240) == 0, resumed.log_tail()
    (restore, *_) = [e for e in resumed.events() if e["event"] == "restore"]
    assert restore["step"] >= 20
    merged = str(tmp_path / "ledger")
    _merge_ledgers(first.ledger_dir, resumed.ledger_dir, restore["step"], merged)
    assert_matches(alone, resumed.out, log, merged)
