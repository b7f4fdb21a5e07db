"""A script's own loop (examples/own_loop.py) under failures matches its failure-free run.

Real launcher, real workers, real etcd. The reference is the script run alone
(`python examples/own_loop.py`, one worker on its own embedded etcd); with
``--exact`` the parameters are bitwise the same for any world size, so the
comparison is exact: parameters, the learning rate at every step, every
evaluation's metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from elastic.train.ledger import check_ledger
from tests.runtime.harness import REPO, Job

OWN_LOOP = os.path.join(REPO, "examples", "own_loop.py")
ARGS = ["--exact", "--steps", "60", "--step-time", "0.05", "--num-workers", "2"]
DATASET = 1440


def _metrics(path: str) -> tuple[dict[int, float], dict[int, dict]]:
    lrs, evals = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "lr" in rec:
                assert lrs.setdefault(rec["step"], rec["lr"]) == rec["lr"]
            else:
                assert evals.setdefault(rec["step"], rec["eval"]) == rec["eval"]
    return lrs, evals


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alone")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run(
        [
            sys.executable,
            OWN_LOOP,
            *ARGS,
            "--out",
            str(tmp / "final.pt"),
            "--metrics",
            str(tmp / "metrics.jsonl"),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return str(tmp / "final.pt"), str(tmp / "metrics.jsonl")


def test_own_loop_alone_finishes_with_evaluations(alone):
    final, metrics = alone
    lrs, evals = _metrics(metrics)
    assert sorted(lrs) == list(range(1, 61))
    assert sorted(evals) == [20, 40, 60]
    assert torch.load(final)["best_accuracy"] > 0.5


@pytest.mark.parametrize("rank", [0, 1], ids=["rank0", "nonzero-rank"])
def test_sigkill_in_own_loop_matches_the_run_alone_bitwise(tmp_path, etcd_url, jobs, alone, rank):
    metrics = str(tmp_path / "metrics.jsonl")
    job = Job(
        tmp_path,
        nproc=3,
        etcd_url=etcd_url,
        script=OWN_LOOP,
        script_args=[*ARGS, "--metrics", metrics],
        extra=["--max-restarts", "0"],
    )
    jobs.append(job)
    job.wait_step(15)
    victim = job.world()[rank]
    os.kill(job.pid_of(victim), signal.SIGKILL)
    assert job.wait(240) == 0, job.log_tail()
    ref_final, ref_metrics = alone
    a, b = torch.load(ref_final), torch.load(job.out)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["best_accuracy"] == b["best_accuracy"]
    ref_lrs, ref_evals = _metrics(ref_metrics)
    lrs, evals = _metrics(metrics)
    assert lrs == ref_lrs  # every step, the reference's learning rate
    assert evals == ref_evals
    report = check_ledger(job.ledger_dir, DATASET, epochs=[0, 1])
    assert not report.duplicated, report.duplicated
    assert report.epochs[0] == DATASET and report.epochs[1] == 60 * 48 - DATASET
