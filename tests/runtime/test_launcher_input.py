"""`elastic run` refuses bad input with a clear message and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from .harness import CLASSIFIER, REPO


def run_cli(*args: str, cwd: str, timeout: float = 60.0) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "elastic.cli", "run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - t0


@pytest.mark.parametrize("args,expected", [
    (["-n", "2", "no_such_script.py"], "training script 'no_such_script.py' does not exist"),
    (["-n", "0", CLASSIFIER], "-n/--nproc must be >= 1, got 0"),
    (["--min-workers", "3", "--max-workers", "2", CLASSIFIER],
     "--min-workers (3) is above --max-workers (2)"),
    (["--resume", CLASSIFIER], "--resume needs --checkpoint URL"),
    (["--no-checkpoint", "--checkpoint", "file:///tmp/x", CLASSIFIER],
     "--no-checkpoint contradicts --checkpoint/--checkpoint-every"),
    (["--job", "bad job!", CLASSIFIER], "invalid job id 'bad job!'"),
    (["--etcd", "localhost:2379", CLASSIFIER], "malformed URL 'localhost:2379'"),
])
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, args, expected):
    rc, err, _ = run_cli(*args, cwd=str(tmp_path))
    assert rc != 0
    assert expected in err, err
    assert not os.listdir(tmp_path), "nothing may be started or written on bad input"


def test_unreachable_etcd_fails_within_the_stated_bound(tmp_path):
    rc, err, took = run_cli("--etcd", "http://127.0.0.1:9", "--etcd-timeout", "2", CLASSIFIER,
                            cwd=str(tmp_path))
    assert rc != 0
    assert "connecting to http://127.0.0.1:9 failed for 2.0s (bound)" in err, err
    assert took < 30


def test_resume_from_an_empty_location_is_refused(tmp_path):
    rc, err, _ = run_cli("--resume", "--checkpoint", f"file://{tmp_path}/empty", CLASSIFIER,
                         cwd=str(tmp_path))
    assert rc != 0
    assert "no committed checkpoint" in err and "empty" in err, err


def test_fresh_run_on_a_location_with_checkpoints_is_refused(tmp_path):
    import torch

    from storage import CheckpointStore

    url = f"file://{tmp_path}/ck"
    CheckpointStore(url).save(5, {"w": torch.zeros(2)})
    rc, err, _ = run_cli("--checkpoint", url, CLASSIFIER, cwd=str(tmp_path))
    assert rc != 0
    assert "already holds checkpoints (newest step 5)" in err and "--resume" in err, err


def test_script_outside_elastic_run_gets_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, CLASSIFIER], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode != 0
    assert "not started by `elastic run`" in proc.stderr


def test_checkpoint_every_without_a_location_on_an_external_etcd_is_refused(tmp_path, etcd_url):
    rc, err, _ = run_cli("--etcd", etcd_url, "--checkpoint-every", "10", CLASSIFIER,
                         cwd=str(tmp_path))
    assert rc != 0
    assert "--checkpoint-every needs a location" in err, err
