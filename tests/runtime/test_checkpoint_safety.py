"""`elastic run` against checkpoint locations that are shared, broken or unusable:
each case is refused up front or resolved, never a run that says "finished" and
leaves no checkpoint (issue 10)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from storage import CheckpointStore, layout

from .harness import CLASSIFIER, Job
from .test_launcher_input import run_cli

SHORT = ["--max-steps", "8", "--step-time", "0.0"]


def test_a_location_worker_processes_cannot_share_is_refused_up_front(tmp_path):
    # memory:// lives in one process: two workers each got their own, and rank 0
    # waited for a part that could never arrive.
    rc, err, _ = run_cli(
        "-n", "2", "--checkpoint", "memory://ck", CLASSIFIER, *SHORT, cwd=str(tmp_path), timeout=90
    )
    assert rc != 0
    assert "'memory://ck' lives in one process's memory" in err, err
    assert not glob.glob(str(tmp_path / "*.events.jsonl")), "no worker may start"


def test_an_unusable_location_is_refused_before_training(tmp_path):
    regular = tmp_path / "a-file"
    regular.write_text("not a directory")
    rc, err, _ = run_cli(
        "--checkpoint", f"file://{regular}", CLASSIFIER, *SHORT, cwd=str(tmp_path), timeout=90
    )
    assert rc != 0
    assert f"file://{regular}" in err and "not a writable directory" in err, err
    assert not glob.glob(str(tmp_path / "*.events.jsonl")), "no worker may start"


def test_a_truncated_manifest_at_the_final_step_does_not_swallow_the_final_checkpoint(
    tmp_path, jobs
):
    ck = f"file://{tmp_path}/ck"
    import torch

    CheckpointStore(ck).save(8, {"junk": torch.zeros(3)})
    manifest = tmp_path / "ck" / layout.step_dir(8) / layout.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:50])
    assert CheckpointStore(ck).list() == []  # unreadable: the location counts as empty
    job = Job(tmp_path, nproc=1, script_args=SHORT, extra=["--checkpoint", ck])
    jobs.append(job)
    assert job.wait(120) == 0, job.log_tail()
    store = CheckpointStore(ck)
    assert [c.step for c in store.list()] == [8], job.log_tail()
    assert store.verify().ok
    assert "model" in store.load()[1]
    assert not [e for e in job.events() if e["event"] == "checkpoint_failed"]


def test_a_second_launch_of_the_same_job_on_the_same_location_is_refused(tmp_path, jobs):
    # Two embedded etcds, one cwd: both default to ./elastic-checkpoints/JOB. The
    # first waits for a second worker (min 2, started 1), so it holds the location
    # without training or committing anything while the second launches.
    first = Job(
        tmp_path,
        nproc=1,
        job="shared",
        script_args=SHORT,
        extra=["--min-workers", "2"],
        name="first",
    )
    jobs.append(first)
    first.wait_for(lambda evs: any(e["event"] == "launch" for e in evs), 90, "first launch")
    second = Job(tmp_path, nproc=1, job="shared", script_args=SHORT, name="second")
    jobs.append(second)
    assert second.wait(90) != 0, second.log_tail()
    tail = second.log_tail()
    assert "is claimed by job 'shared'" in tail and "host" in tail and "pid" in tail, tail
    assert first.proc.poll() is None, "the first launch must be unaffected"
    assert CheckpointStore(f"file://{tmp_path}/elastic-checkpoints/shared").list() == []


@pytest.mark.slow  # CI time (19 s); signing stays covered by tests/storage/test_storage_trust.py
def test_a_keyed_run_signs_its_checkpoints_and_resume_needs_a_signed_one(tmp_path, jobs):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    ck = f"file://{tmp_path}/ck"
    job = Job(
        tmp_path,
        nproc=2,
        script_args=SHORT,
        extra=["--checkpoint", ck, "--checkpoint-key-file", str(key)],
    )
    jobs.append(job)
    assert job.wait(120) == 0, job.log_tail()
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "ckpt",
            "verify",
            ck,
            "--checkpoint-key-file",
            str(key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0 and "step 8: ok (signed)" in verify.stdout, verify
    # An unsigned location does not resume under a key.
    plain = f"file://{tmp_path}/plain"
    import torch

    CheckpointStore(plain).save(4, {"w": torch.zeros(1)})
    rc, err, _ = run_cli(
        "--checkpoint",
        plain,
        "--resume",
        "--checkpoint-key-file",
        str(key),
        CLASSIFIER,
        *SHORT,
        cwd=str(tmp_path),
        timeout=90,
    )
    assert rc != 0 and "no committed checkpoint signed with the key" in err, err


@pytest.mark.slow  # CI time (26 s)
def test_a_launcher_joining_a_running_job_does_not_claim_its_location(tmp_path, etcd_url, jobs):
    # The first launcher claims the location and trains; the joiner adds a worker.
    # Were the joiner to claim, it would be refused instead of joining.
    ck = f"file://{tmp_path}/ck"
    long = ["--max-steps", "300", "--epochs", "6", "--step-time", "0.05"]

    def launch(name: str) -> Job:
        job = Job(
            tmp_path / name,
            nproc=1,
            etcd_url=etcd_url,
            job="joined",
            script_args=long,
            extra=["--checkpoint", ck],
            name=name,
        )
        jobs.append(job)
        return job

    first = launch("first")
    first.wait_step(1)
    owner = CheckpointStore(ck).current_claim()
    assert owner is not None and owner.job == "joined"
    joiner = launch("joiner")
    joiner.wait_for(
        lambda evs: any(e["event"] == "launch" and e.get("joining") for e in evs),
        90,
        "the joiner to launch as a joiner",
    )
    first.wait_for(
        lambda evs: any(e["event"] == "generation" and len(e["world"]) == 2 for e in evs),
        90,
        "a World of both workers",
    )
    assert first.wait(180) == 0, first.log_tail()
    assert joiner.wait(60) == 0, joiner.log_tail()
    assert CheckpointStore(ck).current_claim() == owner
    assert [c.step for c in CheckpointStore(ck).list()] == [300]


@pytest.mark.slow  # CI time (19 s)
def test_a_final_step_committed_with_other_contents_fails_the_run_loudly(tmp_path, etcd_url, jobs):
    # Step 8 is committed but its data is damaged, so the resumed run restores
    # step 4 and trains to 8 again: its final save meets that commit, which does
    # not hold its state. Counting "already committed" as success here would end
    # the run "finished" with no usable final checkpoint.
    ck = f"file://{tmp_path}/ck"
    first = Job(
        tmp_path / "a",
        nproc=1,
        etcd_url=etcd_url,
        script_args=SHORT,
        extra=["--checkpoint", ck, "--checkpoint-every", "4"],
        name="first",
    )
    jobs.append(first)
    assert first.wait(120) == 0, first.log_tail()
    data = sorted((tmp_path / "ck" / layout.step_dir(8)).rglob("data-*.bin"))[0]
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    data.write_bytes(bytes(damaged))
    again = Job(
        tmp_path / "b",
        nproc=1,
        etcd_url=etcd_url,
        script_args=SHORT,
        extra=["--checkpoint", ck, "--resume", "--max-restarts", "0"],
        name="again",
    )
    jobs.append(again)
    assert again.wait(120) != 0, again.log_tail()
    assert [e["step"] for e in again.events() if e["event"] == "restore"] == [4]
    failed = [e for e in again.events() if e["event"] == "checkpoint_failed"]
    assert failed and "step 8 is already committed" in failed[-1]["error"], again.log_tail()
    assert "cannot be read back" in failed[-1]["error"]
    assert not any(e["event"] == "finished" for e in again.events())
