"""A live join (elastic/train/livesync.py): the joiner receives the state point
to point from every holder while the World trains a step, then switches in.

A wide layer (512 x 512: 1 MiB tensors, the parameter and two AdamW moments)
so that the big tensors take the point-to-point path, not the small-tensor
broadcast. The joiner's final parameters are bitwise the survivors' (its state
at the switch was theirs: the same state and the same averaged gradients from
there on); both are within 1e-6 of the script run alone (``--exact`` is not
bitwise across world sizes at this width: float32 gradients whose exponents
differ by more than 29 bits do not sum exactly in float64, seen 2e-9 without
any join), the learning rate is the alone run's at every step, every sample is
trained once. Killing the joiner or a sender before the switch leaves no
partial state anywhere: the World goes on and the joiner comes back through a
later World.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from elastic.train.ledger import check_ledger
from tests.loop.reference import ARGS, BATCH, DATASET, OWN_LOOP, STEPS, metrics, run_alone
from tests.runtime.harness import Job

WIDE = ["--width", "512", "--depth", "2"]  # one 512 x 512 layer


@pytest.fixture(scope="module")
def alone_wide(tmp_path_factory) -> tuple[str, str]:
    return run_alone(str(tmp_path_factory.mktemp("alone-wide")), *WIDE)


def _wide(tmp_path, etcd_url, log, step_time: str, **kw) -> Job:
    return Job(
        tmp_path,
        etcd_url=etcd_url,
        script=OWN_LOOP,
        script_args=[*ARGS, *WIDE, "--step-time", step_time, "--metrics", log],
        **kw,
    )


def _join_at(tmp_path, etcd_url, jobs, log: str, step_time: str, step: int):
    """Two workers, then a third from its own launcher once step ``step`` is
    done: (job, joiner, the generation event of the World with the joiner)."""
    job = _wide(tmp_path, etcd_url, log, step_time, nproc=2)
    jobs.append(job)
    job.wait_step(step)
    joiner = _wide(
        tmp_path, etcd_url, log, step_time, nproc=1, job=job.job, name="joiner", out="joiner.pt"
    )
    jobs.append(joiner)
    grown = job.wait_world_of(3, 90)
    assert grown["live"], "the World must train on while the joiner receives"
    return job, joiner, grown


def _diff(a_path: str, b_path: str) -> float:
    a, b = torch.load(a_path)["model"], torch.load(b_path)["model"]
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_close(reference: tuple[str, str], final: str, log: str, ledger_dir: str) -> None:
    assert _diff(reference[0], final) <= 1e-6
    assert metrics(log)[0] == metrics(reference[1])[0]  # the learning rate at every step
    report = check_ledger(ledger_dir, DATASET, epochs=[0, 1])
    assert not report.duplicated, report.duplicated
    assert report.epochs[0] == DATASET and report.epochs[1] == STEPS * BATCH - DATASET


def _joined(job: Job) -> list[dict]:
    return [e for e in job.events() if e["event"] == "joined"]


def test_a_joiner_receives_from_every_holder_and_switches_in_bitwise(
    tmp_path, etcd_url, jobs, alone_wide
):
    log = str(tmp_path / "metrics.jsonl")
    job, joiner, grown = _join_at(tmp_path, etcd_url, jobs, log, step_time="0.15", step=5)
    assert job.wait(240) == 0, job.log_tail()
    assert joiner.wait(60) == 0, joiner.log_tail()
    joined = _joined(job)
    assert len(joined) == 1, joined
    # Two holders served parts; at least the wide layer and its two moments moved.
    assert joined[0]["peers"] == 2 and joined[0]["bytes"] >= 3 * 512 * 512 * 4, joined
    assert (joined[0]["gen"], joined[0]["step"]) == (grown["gen"], grown["step"])
    assert not [e for e in job.events() if e["event"] == "failure"], job.log_tail()
    _assert_close(alone_wide, job.out, log, job.ledger_dir)
    assert _diff(joiner.out, job.out) == 0.0  # bitwise the survivors' from the switch on


@pytest.mark.parametrize(
    "victim",
    ["joiner", pytest.param("sender", marks=pytest.mark.slow)],  # CI time: 44 s each
)
def test_a_join_killed_before_its_switch_leaves_the_world_exact(
    tmp_path, etcd_url, jobs, alone_wide, victim
):
    """SIGKILL the joiner, or a holder serving it, as soon as the live World
    forms: the transfer and the step it overlaps (0.5 s of compute) are under
    way, the switch (after the step's all-reduce) is not reached."""
    log = str(tmp_path / "metrics.jsonl")
    job, joiner, grown = _join_at(tmp_path, etcd_url, jobs, log, step_time="0.5", step=3)
    killed = grown["world"][2] if victim == "joiner" else grown["world"][1]
    os.kill(job.pid_of(killed), signal.SIGKILL)
    job.wait_for(
        lambda evs: [e for e in evs if e["event"] == "generation" and e["gen"] > grown["gen"]],
        90,
        "a World after the interrupted join",
    )
    assert job.wait(300) == 0, job.log_tail()
    assert joiner.wait(60) == 0, joiner.log_tail()
    # The interrupted join never switched in; the World went on and the result is exact.
    assert not [e for e in _joined(job) if e["gen"] == grown["gen"]], _joined(job)
    assert [e for e in job.events() if e["event"] == "failure" and e["gen"] == grown["gen"]]
    _assert_close(alone_wide, job.out, log, job.ledger_dir)
    assert _diff(joiner.out, job.out) == 0.0
