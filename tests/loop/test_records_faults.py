"""examples/own_loop.py reading sharded records (``--sharded-records``) under failures.

Real launcher, real workers, real etcd. The shards hold the rows in the order
the map-style run visits them, so with ``--exact`` a run over the shards ends
bitwise equal to the script run alone over its TensorDataset (the ``alone``
fixture, without ``--sharded-records``): a SIGKILL of one rank mid-run, and
every worker killed after a checkpoint and the job resumed from its
``(shard, offset)`` cursor, change nothing.
"""

from __future__ import annotations

import os
import signal

import pytest

from elastic.train.ledger import check_ledger
from tests.loop.reference import ARGS, BATCH, OWN_LOOP, STEPS, assert_same_model, metrics
from tests.runtime.harness import Job

STREAM = STEPS * BATCH  # the positions of the sharded stream: every step's global batch


def _sharded(tmp_path, etcd_url, log, shards, *, nproc, extra) -> Job:
    return Job(
        tmp_path,
        nproc=nproc,
        etcd_url=etcd_url,
        script=OWN_LOOP,
        script_args=[*ARGS, "--metrics", log, "--sharded-records", shards],
        extra=extra,
    )


@pytest.mark.slow  # CI time (16 s)
def test_sigkill_while_reading_shards_matches_the_map_style_run_alone_bitwise(
    tmp_path, etcd_url, jobs, alone
):
    log = str(tmp_path / "metrics.jsonl")
    job = _sharded(
        tmp_path, etcd_url, log, str(tmp_path / "shards"), nproc=3, extra=["--max-restarts", "0"]
    )
    jobs.append(job)
    job.wait_step(15)
    os.kill(job.pid_of(job.world()[1]), signal.SIGKILL)
    assert job.wait(240) == 0, job.log_tail()
    ref_final, ref_log = alone
    assert_same_model(ref_final, job.out)
    assert metrics(log) == metrics(ref_log)  # the lr of every step, every evaluation
    assert [e for e in job.events() if e["event"] == "failure"], "the kill went unnoticed"
    report = check_ledger(job.ledger_dir, STREAM, epochs=[0])
    assert not report.missing and not report.duplicated, (report.missing, report.duplicated)
    assert report.epochs[0] == STREAM


# Slow suite (CI's time budget); the fast suite covers this path in
# the (shard, offset) round trip in tests/loop/test_records.py.
@pytest.mark.slow
def test_all_workers_killed_then_resume_reads_on_from_the_checkpointed_shard_cursor(
    tmp_path, etcd_url, jobs, alone
):
    ck = f"file://{tmp_path}/ck"
    shards = str(tmp_path / "shards")
    first_log, resumed_log = str(tmp_path / "first.jsonl"), str(tmp_path / "resumed.jsonl")
    first = _sharded(
        tmp_path / "a",
        etcd_url,
        first_log,
        shards,
        nproc=2,
        extra=["--checkpoint", ck, "--checkpoint-every", "10"],
    )
    jobs.append(first)
    first.wait_for(
        lambda evs: [e for e in evs if e["event"] == "checkpoint_committed" and e["step"] >= 20],
        90,
        "checkpoint 20 committed",
    )
    first.kill_everything()
    resumed = _sharded(
        tmp_path / "b",
        etcd_url,
        resumed_log,
        shards,
        nproc=3,
        extra=["--checkpoint", ck, "--checkpoint-every", "10", "--resume"],
    )
    jobs.append(resumed)
    assert resumed.wait(240) == 0, resumed.log_tail()
    restore = [e for e in resumed.events() if e["event"] == "restore"]
    assert restore and restore[0]["step"] >= 20, restore
    start = restore[0]["step"]
    ref_final, ref_log = alone
    assert_same_model(ref_final, resumed.out)
    ref_lrs, ref_evals = metrics(ref_log)
    for log in (first_log, resumed_log):
        lrs, evals = metrics(log)
        assert lrs and all(ref_lrs[s] == lr for s, lr in lrs.items())
        assert all(ref_evals[s] == m for s, m in evals.items())
    lrs, evals = metrics(resumed_log)
    assert sorted(lrs) == list(range(start + 1, STEPS + 1))
    assert sorted(evals) == [s for s in (20, 40, 60) if s > start]
    # The resumed job read exactly the positions after the cursor, each once.
    report = check_ledger(resumed.ledger_dir, STREAM, epochs=[0])
    assert not report.duplicated, report.duplicated
    assert report.missing.get(0, []) == list(range(start * BATCH))
