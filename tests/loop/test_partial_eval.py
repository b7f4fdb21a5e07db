"""evaluate() called by some ranks only is an error naming it on every rank, not a hang."""

from __future__ import annotations

import os

from tests.runtime.harness import Job

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "partial_eval.py")


def test_evaluate_on_one_rank_only_is_refused_on_every_rank(tmp_path, etcd_url, jobs):
    job = Job(tmp_path, nproc=2, etcd_url=etcd_url, script=SCRIPT, script_args=[])
    jobs.append(job)
    rc = job.wait(120)
    assert rc != 0, job.log_tail()
    log = job.log_tail(20000)
    assert "ranks disagree at step 3" in log and "evaluate()" in log, log
    exits = [e for e in job.events() if e["event"] == "exit"]
    assert len(exits) == 2 and all(e["rc"] != 0 for e in exits), exits
    spawns = [e for e in job.events() if e["event"] == "spawn"]
    assert len(spawns) == 2, "a misuse is not restarted"
