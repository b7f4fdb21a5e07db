"""examples/own_loop.py run alone: the failure-free reference the loop tests compare with.

With ``--exact`` its parameters are bitwise the same for any world size, so a
run under failures is compared exactly: parameters, the learning rate at
every step, every evaluation's metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from elastic.train.ledger import check_ledger, check_val_ledger
from tests.runtime.harness import REPO

OWN_LOOP = os.path.join(REPO, "examples", "own_loop.py")
ARGS = ["--exact", "--steps", "60", "--step-time", "0.05", "--num-workers", "2"]
DATASET = 1440  # training samples of own_loop.py
VAL_SET = 300  # its validation samples
STEPS, BATCH = 60, 48


def metrics(path: str) -> tuple[dict[int, float], dict[int, dict]]:
    """The learning rate per step and the metrics per evaluation a run logged
    (a step or an evaluation logged twice, after a resume, must agree)."""
    lrs: dict[int, float] = {}
    evals: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed run
            if "lr" in rec:
                assert lrs.setdefault(rec["step"], rec["lr"]) == rec["lr"], rec
            else:
                assert evals.setdefault(rec["step"], rec["eval"]) == rec["eval"], rec
    return lrs, evals


def run_alone(tmp: str, *extra: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_")}
    env["PYTHONPATH"] = REPO
    # One intra-op thread, as the launcher gives every worker: a wide layer's
    # matmul splits its reduction by thread count (not bitwise otherwise).
    env["OMP_NUM_THREADS"] = "1"
    final, log = os.path.join(tmp, "final.pt"), os.path.join(tmp, "metrics.jsonl")
    done = subprocess.run(
        [sys.executable, OWN_LOOP, *ARGS, *extra, "--out", final, "--metrics", log],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # DataLoader workers fork beside the etcd client: no gRPC fork chatter.
    assert "fork() handlers" not in done.stderr, done.stderr[-2000:]
    return final, log


def assert_same_model(reference: str, final: str) -> None:
    a, b = torch.load(reference), torch.load(final)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["best_accuracy"] == b["best_accuracy"]


def assert_matches(reference: tuple[str, str], final: str, log: str, ledger_dir: str) -> None:
    """Bitwise the reference's parameters, learning rates and evaluations;
    training and validation samples each exactly once."""
    ref_final, ref_log = reference
    assert_same_model(ref_final, final)
    ref_lrs, ref_evals = metrics(ref_log)
    lrs, evals = metrics(log)
    assert lrs == ref_lrs  # every step, the reference's learning rate
    assert evals == ref_evals
    report = check_ledger(ledger_dir, DATASET, epochs=[0, 1])
    assert not report.duplicated, report.duplicated
    assert report.epochs[0] == DATASET and report.epochs[1] == STEPS * BATCH - DATASET
    val = check_val_ledger(ledger_dir, VAL_SET)
    assert val.ok, val.problems
    assert sorted(val.evaluations) == sorted(ref_evals), val.evaluations
