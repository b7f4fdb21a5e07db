"""With grad_shards, Adam training is bitwise identical for any number of workers."""

from __future__ import annotations

import os

from .harness import REPO, Job, max_abs_diff

CHAR_LM = os.path.join(REPO, "examples", "char_lm.py")
ARGS = ["--max-steps", "12"]


def test_char_lm_with_adam_is_bitwise_identical_on_one_and_three_workers(tmp_path, etcd_url, jobs):
    one = Job(tmp_path / "one", nproc=1, etcd_url=etcd_url, script=CHAR_LM, script_args=ARGS)
    jobs.append(one)
    assert one.wait(180) == 0, one.log_tail()
    three = Job(tmp_path / "three", nproc=3, etcd_url=etcd_url, script=CHAR_LM, script_args=ARGS)
    jobs.append(three)
    assert three.wait(180) == 0, three.log_tail()
    assert max_abs_diff(one.out, three.out) == 0.0
