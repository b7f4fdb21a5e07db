"""benchmarks/loop.py --quick end to end: own_loop.py under `elastic run` and the
same loop as plain DDP under torchrun, both measured and reported.

Real etcd, launcher, torchrun and workers; no timing is asserted (a loaded
machine decides those), only that both sides ran every step and were measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "loop.py")
TIMEOUT = 240  # about 30 s on two loaded cores: four short jobs


# Slow suite (CI's time budget); the fast suite covers this path in
# tests/loop (the own loop it times).
@pytest.mark.slow
def test_quick_run_measures_both_sides_for_each_loader_setting(tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    # TMPDIR: every path the benchmark's processes name lies under tmp_path,
    # so whatever a failed run leaves behind can be found and ended.
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(work))
    cmd = [sys.executable, SCRIPT, "--quick", "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        procs.end(procs.mentioning(str(work)))
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    steps = results["config"]["steps"]
    assert results["config"]["repeats"] == 1
    assert set(results["summary"]) == {"small/nw2", "small/nw0"}
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        assert "error" not in run, run.get("error")
        assert run["rc"] == 0 and run["steps"] == steps, run
        assert run["step_time"] > 0 and run["samples_per_s"] > 0, run
        assert set(run["rss_kib"]) == {"0", "1"}, run  # every rank reported its peak
        assert all(kib > 0 for kib in run["rss_kib"].values()), run
    for key, row in results["summary"].items():
        for side in ("elastic", "ddp"):
            assert row[side]["runs"] == 1, (key, row)
            assert row[side]["step_time"] > 0 and row[side]["worker_rss_kib"] > 0, (key, row)
        assert row["step_time_ratio"] > 0 and row["rss_ratio"] > 0, (key, row)

    table = (out / "results.md").read_text()
    assert "| model | loader workers | step time: elastic, DDP (s) |" in table
    rows = [line for line in table.splitlines() if line.startswith("| small:")]
    assert [row.split(" | ")[1] for row in rows] == ["2", "0"], rows
    assert table.strip() in proc.stdout
