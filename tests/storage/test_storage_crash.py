"""Crash consistency: a writer that dies at any I/O call never leaves a torn checkpoint.

Each test first counts the I/O calls of an operation through a FaultyFileSystem,
then repeats the operation on a fresh location once per call, crashing at that
call.  A new store (the restarted job) must then load the previous committed
step, or the new one if the crash came after its manifest landed, never a
mixture, and `verify` must find every listed checkpoint intact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import torch

from chaos.faultfs import FaultPlan, FaultyFileSystem, SimulatedCrash
from storage import CheckpointStore, MissingPartsError, StoreConfig
from tests.storage.testlib import FAST_RETRY, Location, assert_same, rich_state, save_ranks

OLD, NEW = rich_state(1), rich_state(2)
# Small files so that one save crosses several file boundaries.
CONFIG = StoreConfig(max_file_bytes=512, chunk_bytes=128, io_threads=1)


def location_factory(backend: str, tmp_path: Path) -> Callable[[], Location]:
    counter = iter(range(10_000))

    def make() -> Location:
        if backend == "memory":
            fs = fsspec.filesystem("memory", global_store=False, skip_instance_cache=True)
            return Location(url="memory://run", fs=fs, root="/run", share_fs=True)
        root = f"{tmp_path}/run-{next(counter)}"
        return Location(url=f"file://{root}", fs=fsspec.filesystem("file"), root=root)

    return make


def with_step_one(make: Callable[[], Location]) -> Location:
    loc = make()
    loc.store(config=CONFIG).save(1, OLD)
    return loc


def faulty_store(
    loc: Location, plan: FaultPlan | None = None
) -> tuple[CheckpointStore, FaultyFileSystem]:
    ffs = FaultyFileSystem(loc.fs, plan)
    return CheckpointStore(loc.url, fs=ffs, retry=FAST_RETRY, config=CONFIG), ffs


def assert_consistent(loc: Location) -> int:
    """What a restarted job sees: an intact newest step and an intact step 1."""
    survivor = loc.store(config=CONFIG)
    step, state = survivor.load()
    assert step in (1, 2)
    assert_same(OLD if step == 1 else NEW, state)
    assert_same(OLD, survivor.load(1)[1])
    assert survivor.verify().ok
    survivor.gc()  # clearing the dead writer's leftovers must not hurt what is committed
    assert survivor.load()[0] == step
    assert survivor.verify().ok
    return step


@pytest.mark.parametrize("backend", ["memory", "local"])
def test_a_crash_at_every_io_call_of_a_save_never_leaves_a_torn_checkpoint(
    backend: str, tmp_path: Path
) -> None:
    make = location_factory(backend, tmp_path)
    store, probe = faulty_store(with_step_one(make))
    store.save(2, NEW)
    calls = probe.calls
    assert calls >= 8, probe.log  # several files: the test covers real boundaries

    outcomes: Counter[int] = Counter()
    for k in range(1, calls + 1):
        loc = with_step_one(make)
        store, ffs = faulty_store(loc, FaultPlan(crash_at=k))
        with pytest.raises(SimulatedCrash):
            store.save(2, NEW)
        assert ffs.crashed and ffs.calls == k
        outcomes[assert_consistent(loc)] += 1
    if backend == "memory":
        # The manifest put is the last call: every crash happens before the commit.
        assert outcomes == {1: calls}
    else:
        # After the link that commits, removing the temp name can still crash.
        assert outcomes[1] >= calls - 2 and outcomes[2] >= 1


@pytest.mark.parametrize("backend", ["memory", "local"])
def test_a_committer_crash_at_every_io_call_of_a_sharded_save_is_consistent(
    backend: str, tmp_path: Path
) -> None:
    make = location_factory(backend, tmp_path)

    def rank_one_done() -> Location:
        loc = with_step_one(make)
        (info,) = save_ranks(loc, 2, NEW, 2, ranks=[1]).values()
        assert info.committed is False
        return loc

    store, probe = faulty_store(rank_one_done())
    store.save(2, NEW, rank=0, world_size=2, per_rank_state={"rng": torch.arange(3)})
    calls = probe.calls
    for k in range(1, calls + 1):
        loc = rank_one_done()
        store, _ = faulty_store(loc, FaultPlan(crash_at=k))
        with pytest.raises(SimulatedCrash):
            store.save(2, NEW, rank=0, world_size=2, per_rank_state={"rng": torch.arange(3)})
        assert_consistent(loc)


def test_a_rank_that_crashes_mid_save_makes_the_commit_fail_cleanly(tmp_path: Path) -> None:
    make = location_factory("memory", tmp_path)
    store, probe = faulty_store(with_step_one(make))
    store.save(2, NEW, rank=1, world_size=2)
    calls = probe.calls
    for k in range(1, calls + 1):
        loc = with_step_one(make)
        store, _ = faulty_store(loc, FaultPlan(crash_at=k))
        with pytest.raises(SimulatedCrash):
            store.save(2, NEW, rank=1, world_size=2)
        with pytest.raises(MissingPartsError, match=r"rank\(s\) \[1\]"):
            loc.store(config=CONFIG).save(2, NEW, rank=0, world_size=2, timeout=0.05)
        assert assert_consistent(loc) == 1


@pytest.mark.parametrize("backend", ["memory", "local"])
def test_a_crash_at_every_io_call_of_prune_leaves_only_intact_checkpoints(
    backend: str, tmp_path: Path
) -> None:
    make = location_factory(backend, tmp_path)

    def three_steps() -> Location:
        loc = make()
        for step in (1, 2, 3):
            loc.store(config=CONFIG).save(step, OLD if step < 3 else NEW)
        return loc

    store, probe = faulty_store(three_steps())
    assert store.prune(keep_last=1, verify=False) == [1, 2]
    calls = probe.calls
    for k in range(1, calls + 1):
        loc = three_steps()
        store, _ = faulty_store(loc, FaultPlan(crash_at=k))
        with pytest.raises(SimulatedCrash):
            store.prune(keep_last=1, verify=False)
        survivor = loc.store(config=CONFIG)
        listed = [info.step for info in survivor.list()]
        assert listed[-1] == 3 and set(listed) <= {1, 2, 3}
        assert survivor.verify().ok  # a half-deleted step is uncommitted, not torn
        assert_same(NEW, survivor.load()[1])
