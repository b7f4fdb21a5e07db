"""Checkpoints written by a running job."""

from __future__ import annotations

import pytest
import torch

from storage import CheckpointStore

from .harness import Job, max_abs_diff


@pytest.mark.slow  # CI time (30 s); the chaos checkpoint-on-last-step covers it
def test_periodic_checkpoint_on_the_last_step_is_the_final_one(tmp_path, etcd_url, reference, jobs):
    ck = f"file://{tmp_path}/ck"
    # 96 steps, a checkpoint every 48: the periodic and the final one coincide.
    job = Job(
        tmp_path, nproc=2, etcd_url=etcd_url, extra=["--checkpoint", ck, "--checkpoint-every", "48"]
    )
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


SHORT = ["--max-steps", "8", "--step-time", "0.0"]


@pytest.mark.slow  # CI time (20 s)
def test_a_single_machine_job_checkpoints_locally_by_default(tmp_path, jobs):
    # Embedded etcd (no --etcd): every worker is on this machine, so the final
    # checkpoint goes to ./elastic-checkpoints/JOB without being asked for.
    job = Job(tmp_path, nproc=2, script_args=SHORT)
    jobs.append(job)
    assert job.wait(120) == 0, job.log_tail()
    location = tmp_path / "elastic-checkpoints" / job.job
    assert f"checkpoints in file://{location}" in job.log_tail(20000)
    store = CheckpointStore(f"file://{location}")
    assert store.latest() is not None and store.latest().step == 8
    assert store.verify().ok
    # --no-checkpoint opts out: nothing is written for that job.
    quiet = Job(tmp_path, nproc=1, script_args=SHORT, extra=["--no-checkpoint"], name="quiet")
    jobs.append(quiet)
    assert quiet.wait(120) == 0, quiet.log_tail()
    assert not (tmp_path / "elastic-checkpoints" / quiet.job).exists()


def test_a_job_on_an_external_etcd_has_no_default_location(tmp_path, etcd_url, jobs):
    # With --etcd, workers may be on several machines: a local default would
    # split one checkpoint over their disks, so there is none.
    job = Job(tmp_path, nproc=1, etcd_url=etcd_url, script_args=SHORT)
    jobs.append(job)
    assert job.wait(120) == 0, job.log_tail()
    assert not (tmp_path / "elastic-checkpoints").exists()


@pytest.mark.slow  # CI time (23 s)
def test_resuming_a_finished_run_ends_at_once_on_its_final_checkpoint(tmp_path, etcd_url, jobs):
    # The restored step is the last one: the final save finds that step committed
    # already and must accept it, not crash-loop on "already committed".
    ck = f"file://{tmp_path}/ck"
    first = Job(
        tmp_path / "a", nproc=1, etcd_url=etcd_url, script_args=SHORT, extra=["--checkpoint", ck]
    )
    jobs.append(first)
    assert first.wait(120) == 0, first.log_tail()
    again = Job(
        tmp_path / "b",
        nproc=2,
        etcd_url=etcd_url,
        script_args=SHORT,
        extra=["--checkpoint", ck, "--resume", "--max-restarts", "0"],
    )
    jobs.append(again)
    assert again.wait(120) == 0, again.log_tail()
    assert [e["step"] for e in again.events() if e["event"] == "restore"] == [8]
    assert not [e for e in again.events() if e["event"] == "checkpoint_failed"]
    assert [c.step for c in CheckpointStore(ck).list()] == [8]


@pytest.mark.slow  # CI time (20 s)
def test_resume_from_a_checkpoint_that_does_not_verify_stops_without_restarts(tmp_path, jobs):
    import glob
    import os

    ck = f"file://{tmp_path}/ck"
    first = Job(tmp_path / "first", nproc=1, script_args=SHORT, extra=["--checkpoint", ck])
    jobs.append(first)
    assert first.wait(120) == 0, first.log_tail()
    data = [p for p in glob.glob(f"{tmp_path}/ck/**/data-*", recursive=True) if os.path.getsize(p)]
    assert data, "no data file written"
    with open(data[0], "r+b") as f:  # a bit flip the checksum catches
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = Job(
        tmp_path / "again",
        nproc=2,
        script_args=SHORT,
        extra=["--checkpoint", ck, "--resume", "--max-restarts", "5"],
    )
    jobs.append(again)
    assert again.wait(120) != 0
    log = again.log_tail(20000)
    assert "cannot restore from" in log, log
    assert "Traceback" not in log, log
    spawns = [e for e in again.events() if e["event"] == "spawn"]
    assert len(spawns) == 2, f"restarted a worker that cannot restore: {len(spawns)} spawns"
