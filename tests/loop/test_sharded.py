"""Sharded optimizer state (--shard-state --replicas K) through a fleet's changes.

examples/own_loop.py (AdamW, a scheduler, clipping, micro-batches) with each
shard of the optimizer state on K workers only. Every run ends bitwise equal
to the script run alone (``--exact``): the sharded update is the replicated
one computed by slices, and a failure is recovered from a surviving copy in
process, with no storage read. Real launcher, real workers, real etcd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.loop.reference import ARGS, OWN_LOOP, assert_matches, assert_same_model
from tests.runtime.harness import Job

SHARD = ["--shard-state", "--replicas", "2"]


def _sharded(tmp_path, etcd_url, log, extra=(), **kw) -> Job:
    return Job(
        tmp_path,
        etcd_url=etcd_url,
        script=kw.pop("script", OWN_LOOP),
        script_args=[*ARGS, "--metrics", log, *kw.pop("script_args", [])],
        extra=[*SHARD, *extra],
        **kw,
    )


def _generations(job: Job) -> list[dict]:
    return [e for e in job.events() if e["event"] == "generation"]


def test_a_killed_owner_is_recovered_from_the_surviving_copy(tmp_path, etcd_url, jobs, alone):
    log = str(tmp_path / "metrics.jsonl")
    job = _sharded(tmp_path, etcd_url, log, nproc=3, extra=["--max-restarts", "0"])
    jobs.append(job)
    job.wait_step(20)
    first = _generations(job)[0]
    assert first["shards"]["k"] == 2
    victim = job.world()[1]
    os.kill(job.pid_of(victim), signal.SIGKILL)
    smaller = job.wait_world_of(2, 60)
    assert job.wait(240) == 0, job.log_tail()
    # The dead owner's shards were copied to the survivors from the other copy.
    assert smaller["shards"]["moved"] > 0, smaller
    assert not [e for e in job.events() if e["event"] == "restore"], "no storage read"
    assert_matches(alone, job.out, log, job.ledger_dir)


@pytest.mark.slow  # four workers on two cores: about 40 s
def test_two_owners_of_different_shards_killed_at_once_lose_nothing(
    tmp_path, etcd_url, jobs, alone
):
    log = str(tmp_path / "metrics.jsonl")
    job = _sharded(tmp_path, etcd_url, log, nproc=4, extra=["--max-restarts", "0"])
    jobs.append(job)
    job.wait_step(20)
    placement = _generations(job)[-1]["shards"]["placement"]
    held = {m: {i for i, owners in placement.items() if m in owners} for m in job.world()}
    # Two owners with no shard in common: every shard keeps a copy.
    a, b = next((a, b) for a in held for b in held if a < b and not held[a] & held[b])
    os.kill(job.pid_of(a), signal.SIGKILL)
    os.kill(job.pid_of(b), signal.SIGKILL)
    smaller = job.wait_world_of(2, 60)
    assert job.wait(240) == 0, job.log_tail()
    assert smaller["shards"]["moved"] > 0, smaller
    assert not [e for e in job.events() if e["event"] == "restore"], "no storage read"
    assert_matches(alone, job.out, log, job.ledger_dir)


FAULT_SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_fault.py")


@pytest.mark.parametrize(
    "fault,rolled",
    [pytest.param("pending:20:1", True, marks=pytest.mark.slow), ("die:20:1", False)],  # CI time
    ids=["commit-header-failed-on-one-rank", "owner-died-before-the-exchange"],
)
def test_a_step_committed_anywhere_is_rolled_forward_not_redone(
    tmp_path, etcd_url, jobs, alone, monkeypatch, fault, rolled
):
    log = str(tmp_path / "metrics.jsonl")
    monkeypatch.setenv("SHARD_FAULT", fault)
    job = _sharded(tmp_path, etcd_url, log, nproc=3, script=FAULT_SCRIPT)
    jobs.append(job)
    assert job.wait(240) == 0, job.log_tail()
    assert os.path.exists(os.path.join(job.dir, "shard-fault.fired")), "the fault never fired"
    gens = _generations(job)
    assert len(gens) >= 2, "the fault must have re-formed the World"
    after = gens[1]
    assert after["step"] == 21, after  # the step of the fault counts, on every rank
    assert bool(after["shards"]["rolled"]) == rolled, after
    assert not [e for e in job.events() if e["event"] == "restore"], "no storage read"
    assert_matches(alone, job.out, log, job.ledger_dir)  # no sample twice: no step redone


def test_servers_hold_the_state_and_a_killed_server_is_recovered(tmp_path, etcd_url, jobs, alone):
    log = str(tmp_path / "metrics.jsonl")
    job = _sharded(
        tmp_path, etcd_url, log, nproc=2, extra=["--servers", "2", "--max-restarts", "0"]
    )
    jobs.append(job)
    job.wait_step(20)
    roles = {e["member"]: e["role"] for e in job.events() if e["event"] == "spawn"}
    servers = sorted(m for m, r in roles.items() if r == "server")
    assert len(servers) == 2 and len(roles) == 4, roles
    os.kill(job.pid_of(servers[0]), signal.SIGKILL)
    smaller = job.wait_world_of(3, 60)
    assert job.wait(240) == 0, job.log_tail()
    assert smaller["shards"]["k"] == 1, smaller  # one server left: one copy of each shard
    assert not [e for e in job.events() if e["event"] == "restore"], "no storage read"
    # Servers compute nothing: no sample in their ledger lines.
    for name in os.listdir(job.ledger_dir):
        if any(s in name for s in servers) and name.startswith("ledger"):
            with open(os.path.join(job.ledger_dir, name), encoding="utf-8") as f:
                assert all(not json.loads(line)["ids"] for line in f), name
    assert_matches(alone, job.out, log, job.ledger_dir)


@pytest.mark.slow  # CI time (15 s)
def test_a_leaving_owner_hands_its_shards_on(tmp_path, etcd_url, jobs, alone):
    log = str(tmp_path / "metrics.jsonl")
    job = _sharded(tmp_path, etcd_url, log, nproc=3)
    jobs.append(job)
    job.wait_step(15)
    leaver = job.world()[2]
    os.kill(job.pid_of(leaver), signal.SIGTERM)
    smaller = job.wait_world_of(2, 60)
    assert job.wait(240) == 0, job.log_tail()
    assert smaller["shards"]["moved"] > 0, smaller
    assert not [e for e in job.events() if e["event"] in ("failure", "restore")], job.log_tail()
    assert_matches(alone, job.out, log, job.ledger_dir)


@pytest.mark.slow  # CI time (19 s)
def test_a_joiner_takes_shards_from_their_owners(tmp_path, etcd_url, jobs, alone):
    log = str(tmp_path / "metrics.jsonl")
    slow = ["--step-time", "0.15"]
    job = _sharded(tmp_path, etcd_url, log, nproc=2, script_args=slow)
    jobs.append(job)
    job.wait_step(5)
    joiner = _sharded(
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
    assert grown["shards"]["moved"] > 0, grown
    assert job.wait(240) == 0, job.log_tail()
    assert joiner.wait(60) == 0, joiner.log_tail()
    assert_matches(alone, job.out, log, job.ledger_dir)
    assert_matches(alone, joiner.out, log, job.ledger_dir)


def test_both_copies_of_a_shard_lost_restores_the_newest_checkpoint(
    tmp_path, etcd_url, jobs, alone
):
    log = str(tmp_path / "metrics.jsonl")
    ck = ["--checkpoint", f"file://{tmp_path}/ck", "--checkpoint-every", "10"]
    job = _sharded(tmp_path, etcd_url, log, nproc=3, extra=[*ck, "--max-restarts", "0"])
    jobs.append(job)
    job.wait_for(
        lambda evs: [e for e in evs if e["event"] == "checkpoint_committed" and e["step"] >= 20],
        120,
        "checkpoint 20 committed",
    )
    # Two of three owners with k=2: every pair of owners shares some shard.
    world = job.world()
    for member in world[1:]:
        os.kill(job.pid_of(member), signal.SIGKILL)
    assert job.wait(240) == 0, job.log_tail()
    (restore, *_) = [e for e in job.events() if e["event"] == "restore"]
    assert restore["lost_shards"], restore
    assert restore["step"] >= 20 and restore["step"] % 10 == 0
    assert_same_model(alone[0], job.out)


def test_without_a_checkpoint_a_lost_shard_is_a_clear_error(tmp_path, etcd_url, jobs):
    log = str(tmp_path / "metrics.jsonl")
    job = _sharded(
        tmp_path,
        etcd_url,
        log,
        nproc=2,
        extra=["--no-checkpoint", "--max-restarts", "0", "--replicas", "1"],
    )
    jobs.append(job)
    job.wait_step(10)
    os.kill(job.pid_of(job.world()[1]), signal.SIGKILL)
    assert job.wait(120) != 0
    tail = job.log_tail()
    assert "lost every one of their 1 copies" in tail and "no checkpoint" in tail, tail


@pytest.mark.parametrize(
    "sharded_resume",
    [pytest.param(False, marks=pytest.mark.slow), True],  # CI time: 30 s each
    ids=["replicated-W2", "sharded-W3"],
)
def test_a_sharded_checkpoint_resumes_at_another_size_with_or_without_sharding(
    tmp_path, etcd_url, jobs, alone, sharded_resume
):
    log = str(tmp_path / "metrics.jsonl")
    ck = ["--checkpoint", f"file://{tmp_path}/ck", "--checkpoint-every", "10"]
    first = _sharded(tmp_path / "a", etcd_url, log, nproc=4, extra=ck)
    jobs.append(first)
    first.wait_for(
        lambda evs: [e for e in evs if e["event"] == "checkpoint_committed" and e["step"] >= 20],
        180,
        "checkpoint 20 committed",
    )
    first.kill_everything()
    _export_holds_the_whole_optimizer_state(f"file://{tmp_path}/ck", str(tmp_path / "x.pt"))
    again = [*ck, "--resume"]
    resumed = Job(
        tmp_path / "b",
        etcd_url=etcd_url,
        script=OWN_LOOP,
        script_args=[*ARGS, "--metrics", str(tmp_path / "resumed.jsonl")],
        extra=[*SHARD, *again] if sharded_resume else again,
        nproc=3 if sharded_resume else 2,
    )
    jobs.append(resumed)
    assert resumed.wait(240) == 0, resumed.log_tail()
    (restore, *_) = [e for e in resumed.events() if e["event"] == "restore"]
    assert restore["step"] >= 20
    assert_same_model(alone[0], resumed.out)


def _export_holds_the_whole_optimizer_state(url: str, out: str) -> None:
    """`elastic ckpt export` of a sharded checkpoint: the optimizer entry holds
    every parameter's state, joined from the ranks' shards, shaped as the model."""
    proc = subprocess.run(
        [sys.executable, "-m", "elastic.cli", "ckpt", "export", url, "--out", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(out, weights_only=True)
    (opt,) = [v for v in exported.values() if isinstance(v, dict) and "state" in v]
    shapes = [p.shape for k, p in exported["model"].items() if k.endswith(("weight", "bias"))]
    assert sorted(opt["state"]) == list(range(len(shapes)))
    for index, shape in enumerate(shapes):
        assert opt["state"][index]["exp_avg"].shape == shape, index
        assert opt["state"][index]["exp_avg_sq"].abs().sum() > 0, index  # stepped, not zeros
