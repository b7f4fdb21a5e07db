"""Checkpoints written by a running job."""

from __future__ import annotations

import torch

from storage import CheckpointStore

from .harness import Job, max_abs_diff


def test_periodic_checkpoint_on_the_last_step_is_the_final_one(
        tmp_path, etcd_url, reference, jobs):
    ck = f"file://{tmp_path}/ck"
    # 96 steps, a checkpoint every 48: the periodic and the final one coincide.
    job = Job(tmp_path, nproc=2, etcd_url=etcd_url,
              extra=["--checkpoint", ck, "--checkpoint-every", "48"])
    jobs.append(job)
    assert job.wait(120) == 0, job.log_tail()
    store = CheckpointStore(ck)
    assert [c.step for c in store.list()] == [48, 96]
    assert store.verify().ok
    step, state = store.load()
    assert step == 96
    torch.save(dict(state["model"]), tmp_path / "from_ckpt.pt")
    assert max_abs_diff(str(tmp_path / "from_ckpt.pt"), reference) <= 1e-5
    assert not [e for e in job.events() if e["event"] == "checkpoint_failed"]
