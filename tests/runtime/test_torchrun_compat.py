"""An unmodified torchrun script runs under `elastic run --torchrun-compat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_style.py")


def run(tmp_path, *extra, env=None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "run",
            "--torchrun-compat",
            "-n",
            "2",
            *extra,
            SCRIPT,
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RESULT_DIR": str(tmp_path), **(env or {})},
    )


def results(tmp_path):
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]


def test_plain_script_gets_torchrun_environment(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [(r["rank"], r["world"], r["attempt"]) for r in results(tmp_path)] == [
        (0, 2, 0),
        (1, 2, 0),
    ]


def test_a_crash_restarts_all_workers_with_the_restart_count_set(tmp_path):
    proc = run(tmp_path, "--max-restarts", "2", env={"CRASH_ON_FIRST_ATTEMPT": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "rank 1 exited with 7: restarting all workers" in proc.stderr
    # One restart: a second one means attempt 1 failed too (stderr says why).
    assert {r["attempt"] for r in results(tmp_path)} == {1}, proc.stderr[-3000:]


def test_restarts_are_bounded(tmp_path):
    proc = run(tmp_path, "--max-restarts", "0", env={"CRASH_ON_FIRST_ATTEMPT": "1"})
    assert proc.returncode == 1
    assert "no restarts left (0)" in proc.stderr


def test_the_shipped_torchrun_example_runs_unchanged(tmp_path):
    example = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(SCRIPT))), "examples", "torchrun_ddp.py"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "elastic.cli", "run", "--torchrun-compat", "-n", "2", example],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "world 2, restart 0, final loss" in proc.stdout
