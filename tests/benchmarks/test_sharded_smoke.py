"""examples/sharded.py and benchmarks/sharded.py end to end on a tiny model, 2 workers.

Real launcher, embedded etcd and workers. No timing is asserted (a loaded
machine decides those): only the memory claim (each rank holds k/W of the
replicated optimizer state), that every case ran and was reported, and that
a kill was recovered (from a peer with k=2, from the checkpoint with k=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks", "sharded.py")
EXAMPLE = os.path.join(REPO, "examples", "sharded.py")
TINY = ["--width", "32", "--depth", "2"]


def _run(cmd: list[str], work, timeout: float) -> subprocess.CompletedProcess:
    # TMPDIR: every path the processes name lies under the test's tmp_path, so
    # whatever a failed run leaves behind can be found and ended.
    env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(work))
    try:
        return subprocess.run(
            cmd, env=env, cwd=str(work), capture_output=True, text=True, timeout=timeout
        )
    finally:
        procs.end(procs.mentioning(str(work)))


def _example_reports(work, name: str, *launcher: str, expect_world: int = 2) -> list[dict]:
    report = work / f"{name}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "elastic.cli",
        "run",
        "-n",
        "2",
        "--no-checkpoint",
        "--max-restarts",
        "0",
        "--event-log",
        str(work / f"{name}.events.jsonl"),
        *launcher,
        EXAMPLE,
        *TINY,
        "--steps",
        "5",
        "--report",
        str(report),
    ]
    proc = _run(cmd, work, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["rank"] for r in lines) == list(range(expect_world)), lines
    assert all(r["world"] == expect_world and r["step"] == 5 for r in lines), lines
    return lines


def test_each_rank_holds_half_the_optimizer_state_with_one_copy_of_each_shard(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    replicated = _example_reports(work, "replicated")
    sharded = _example_reports(work, "sharded", "--shard-state", "--replicas", "1")

    assert not any(r["sharded"] for r in replicated) and all(r["sharded"] for r in sharded)
    # Replicated, every rank holds AdamW's whole state: two float32 moments per
    # parameter and a float32 step per tensor (the example's formula).
    assert all(r["optimizer_state_bytes"] == r["replicated_bytes"] for r in replicated)
    full = replicated[0]["optimizer_state_bytes"]
    for r in sharded:
        assert r["optimizer_state_bytes"] == pytest.approx(full / 2, rel=0.1), (r, full)
    # The shards cover the state once: together the ranks hold it all.
    together = sum(r["optimizer_state_bytes"] for r in sharded)
    assert together == pytest.approx(full, rel=0.05), (sharded, full)


@pytest.mark.slow  # 50-70 s on two loaded cores: five short jobs
def test_benchmark_reports_every_case_and_the_state_per_worker(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "sharded.json"
    cmd = [
        sys.executable,
        BENCH,
        "--workers",
        "2",
        *TINY,
        "--steps",
        "12",
        "--warmup",
        "3",
        "--kill-step",
        "7",
        "--checkpoint-every",
        "4",
        # A tiny model's step takes milliseconds: the kill must land mid-run.
        "--step-time",
        "0.15",
        "--give-up",
        "60",
        "--run-timeout",
        "90",
        "--json",
        str(out),
    ]
    proc = _run(cmd, work, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads(out.read_text())
    summary = results["summary"]
    cases = {"replicated", "sharded_k1", "sharded_k2", "kill_k2", "kill_k1"}
    assert set(summary) == cases, summary
    assert {r["case"] for r in results["runs"]} == cases
    for run in results["runs"]:
        assert "error" not in run, run.get("error")
    for case in ("replicated", "sharded_k1", "sharded_k2"):
        row = summary[case]
        assert row["runs"] == 1 and row["step_time"] > 0 and row["worker_rss_kib"] > 0, row
        assert row["step_time_ratio"] > 0 and row["rss_ratio"] > 0, row
    # The memory claim at W=2: k=1 holds half the replicated state, k=2 all of it.
    assert summary["sharded_k1"]["state_bytes_ratio"] == pytest.approx(0.5, rel=0.1)
    assert summary["sharded_k2"]["state_bytes_ratio"] == pytest.approx(1.0, rel=0.1)
    # The same World, the same gradient: the update by slices is the replicated one.
    assert summary["sharded_k1"]["max_abs_diff_vs_replicated"] == 0.0
    assert summary["sharded_k2"]["max_abs_diff_vs_replicated"] == 0.0

    peer, ckpt = summary["kill_k2"], summary["kill_k1"]
    assert peer["recovered"] == peer["finished"] == 1, peer
    assert ckpt["recovered"] == ckpt["finished"] == 1, ckpt
    assert peer["seconds"] > 0 and ckpt["seconds"] > 0
    assert peer["restored"] == 0 and peer["redone"] == 0, peer  # a surviving copy: no storage
    assert ckpt["restored"] == 1 and ckpt["redone"] >= 1, ckpt  # no copy left: the checkpoint
    (kill_k1,) = [r for r in results["runs"] if r["case"] == "kill_k1"]
    assert kill_k1["restored_step"] == kill_k1["resumed_after"], kill_k1

    table = results["table"]
    assert table.strip() in proc.stdout
    for label in (
        "| replicated |",
        "| sharded k=1 |",
        "| sharded k=2 |",
        "| kill, k=2",
        "| kill, k=1",
    ):
        assert label in table, table


@pytest.mark.slow  # CI time; servers stay covered by tests/loop/test_sharded.py
def test_servers_hold_the_optimizer_state_and_workers_none(tmp_path):
    lines = _example_reports(
        tmp_path, "servers", "--servers", "2", "--replicas", "1", expect_world=4
    )
    events = [json.loads(x) for x in (tmp_path / "servers.events.jsonl").read_text().splitlines()]
    roles = {e["member"]: e["role"] for e in events if e["event"] == "spawn"}
    gens = [e for e in events if e["event"] == "generation"]
    by_rank = {r["rank"]: r for r in lines}
    world = gens[0]["world"]
    held = {roles[m]: [] for m in world}
    for rank, member in enumerate(world):
        held[roles[member]].append(by_rank[rank]["optimizer_state_bytes"])
    total = by_rank[0]["replicated_bytes"]
    assert held["worker"] == [0, 0], held
    assert sum(held["server"]) >= total and all(
        abs(b - total / 2) <= 0.1 * total for b in held["server"]
    ), (held, total)
