"""benchmarks/failures.py end to end on its cheapest fault, one trial, short run.

Real etcd, real launcher and workers, real torchrun: the kill is injected, the
job must recover, finish, and end on the failure-free run's parameters, and
the JSON and Markdown the benchmark writes must say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "failures.py")
TIMEOUT = 240


@pytest.mark.slow  # about 80 s on two loaded cores: two jobs and a torchrun run
def test_kill_trial_recovers_and_is_reported(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    # TMPDIR: every path the benchmark's processes name lies under tmp_path,
    # so whatever a failed run leaves behind can be found and ended.
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(work))
    cmd = [
        sys.executable,
        SCRIPT,
        "--faults",
        "kill",
        "--trials",
        "1",
        "--steps",
        "60",
        "--fault-step",
        "25",
        "--give-up",
        "60",
        "--out",
        str(out),
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        procs.end(procs.mentioning(str(work)))
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "failures.json").read_text())
    assert results["config"]["faults"] == ["kill"]
    (trial,) = results["elastic"]["kill"]["trials"]
    assert trial["recovered"] and trial["finished"], trial
    assert 0 < trial["seconds"] < 60, trial
    assert trial["redone"] == 0, trial
    assert trial["fault_at_step"] >= 25 and trial["victim_rank"] == 1, trial
    assert trial["params_equal"] and trial["max_abs_diff"] <= 1e-5, trial
    summary = results["elastic"]["kill"]["summary"]
    assert summary["trials"] == 1 and summary["recovered"] == 1, summary
    assert summary["median_s"] == trial["seconds"]

    (torchrun,) = results["torchrun"]["kill"]["trials"]
    assert "recovered" in torchrun and "error" not in torchrun, torchrun
    if torchrun["recovered"]:
        # It restarts from the step-20 checkpoint: whatever it did after is redone
        # (one more if a step ended in the instant of the kill).
        assert torchrun["seconds"] > 0
        assert (
            0
            < torchrun["fault_at_step"] - 20
            <= torchrun["redone"]
            <= torchrun["fault_at_step"] - 19
        ), torchrun
    assert set(results["torchrun"]) == {"kill"}

    table = (out / "failures.md").read_text()
    assert "| fault | this runtime median s (min-max) |" in table
    row = next(line for line in table.splitlines() if line.startswith("| kill |"))
    assert f"{trial['seconds']:.2f}" in row and "| 1/1 |" in row, row
