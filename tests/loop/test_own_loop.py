"""A script's own loop (examples/own_loop.py) under failures matches its failure-free run.

Real launcher, real workers, real etcd. The reference is the script run alone
(`python examples/own_loop.py`, one worker on its own embedded etcd); with
``--exact`` the parameters are bitwise the same for any world size, so the
comparison is exact: parameters, the learning rate at every step, every
evaluation's metrics.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.loop.reference import ARGS, OWN_LOOP, assert_matches, metrics
from tests.runtime.harness import Job


def test_own_loop_alone_finishes_with_evaluations(alone):
    final, log = alone
    lrs, evals = metrics(log)
    assert sorted(lrs) == list(range(1, 61))
    assert sorted(evals) == [20, 40, 60]
    assert torch.load(final)["best_accuracy"] > 0.5


@pytest.mark.parametrize(
    "rank", [pytest.param(0, marks=pytest.mark.slow), 1], ids=["rank0", "nonzero-rank"]
)  # CI time: rank 0 killed stays fast in tests/runtime/test_failures.py
def test_sigkill_in_own_loop_matches_the_run_alone_bitwise(tmp_path, etcd_url, jobs, alone, rank):
    log = str(tmp_path / "metrics.jsonl")
    job = Job(
        tmp_path,
        nproc=3,
        etcd_url=etcd_url,
        script=OWN_LOOP,
        script_args=[*ARGS, "--metrics", log],
        extra=["--max-restarts", "0"],
    )
    jobs.append(job)
    job.wait_step(15)
    victim = job.world()[rank]
    os.kill(job.pid_of(victim), signal.SIGKILL)
    assert job.wait(240) == 0, job.log_tail()
    assert_matches(alone, job.out, log, job.ledger_dir)
