"""Sharded saves by real processes (slow: each process imports torch)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from storage import CheckpointStore
from tests.storage.testlib import assert_same, per_rank_state, rich_state

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _rank_main(url: str, rank: int, world: int, queue: multiprocessing.Queue) -> None:
    try:
        info = CheckpointStore(url).save(
            7,
            rich_state(),
            rank=rank,
            world_size=world,
            generation=2,
            per_rank_state=per_rank_state(rank),
            timeout=60,
        )
        queue.put((rank, "ok", info.committed))
    except Exception as exc:  # reported to the parent, which asserts on it
        queue.put((rank, type(exc).__name__, str(exc)))


def _run_ranks(url: str, world: int, ranks: list[int]) -> dict[int, tuple]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(url, r, world, queue)) for r in ranks]
    try:
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, *rest = queue.get(timeout=180)
            results[rank] = tuple(rest)
        for p in procs:
            p.join(timeout=60)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def test_three_processes_save_one_checkpoint_that_loads_anywhere(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/ckpt"
    results = _run_ranks(url, 3, [0, 1, 2])
    assert results == {0: ("ok", True), 1: ("ok", False), 2: ("ok", False)}
    loaded = CheckpointStore(url).load_checkpoint()
    assert (loaded.step, loaded.world_size, loaded.generation) == (7, 3, 2)
    assert_same(rich_state(), loaded.state)
    assert_same({r: per_rank_state(r) for r in range(3)}, loaded.per_rank)


def test_a_dead_rank_fails_the_commit_naming_it(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/ckpt"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from storage import CheckpointStore; from tests.storage.testlib "
            "import rich_state; CheckpointStore(sys.argv[1]).save(7, rich_state(), rank=0, "
            "world_size=2, timeout=1)",
            url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0
    assert "MissingPartsError" in done.stderr and "rank(s) [1] of world size 2" in done.stderr
    assert CheckpointStore(url).list() == []


def test_the_benchmark_smoke_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/checkpoint.py",
            "--quick",
            "--ranks",
            "1",
            "--dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "| save (s) |" in done.stdout and "| load (s) |" in done.stdout
