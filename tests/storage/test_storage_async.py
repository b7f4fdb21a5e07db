"""Asynchronous save: snapshot on the caller's thread, one save in flight, errors surface."""

from __future__ import annotations

import threading

import pytest
import torch

from storage import SaveTimeoutError, StaleWriterError
from tests.storage.testlib import Location, assert_same, rich_state

WAIT = 30.0  # generous bound for anything that should happen at once


def blocking_fence() -> tuple[threading.Event, threading.Event, object]:
    """A fence that holds the background save just before its commit until released."""
    entered, release = threading.Event(), threading.Event()

    def fence(step: int) -> bool:
        entered.set()
        assert release.wait(WAIT), "test never released the fence"
        return True

    return entered, release, fence


def clone(tree: object) -> object:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone(v) for v in tree)
    return tree


def test_the_caller_may_change_its_state_as_soon_as_save_async_returns(
    memory_location: Location,
) -> None:
    state = rich_state()
    expected = clone(state)
    entered, release, fence = blocking_fence()
    handle = memory_location.store().save_async(1, state, fence=fence)
    # Training goes on while the save is still running.
    state["model"]["0.weight"].add_(1.0)
    state["tensors"]["noncontig"].zero_()
    state["plain"]["list"].append("mutated")
    state["plain"]["step"] = 8
    assert entered.wait(WAIT) and not handle.done()
    release.set()
    handle.wait(WAIT)
    assert_same(expected, memory_location.store().load()[1])


def test_a_second_save_waits_for_the_one_in_flight(memory_location: Location) -> None:
    store = memory_location.store()
    entered, release, fence = blocking_fence()
    first = store.save_async(1, {"x": torch.ones(3)}, fence=fence)
    assert entered.wait(WAIT)
    with pytest.raises(SaveTimeoutError, match=r"previous asynchronous save \(step 1\)"):
        store.save_async(2, {"x": torch.ones(3)}, timeout=0.05)
    with pytest.raises(SaveTimeoutError, match="step 1 still running"):
        first.wait(timeout=0.01)
    release.set()
    second = store.save_async(2, {"x": torch.full((3,), 2.0)})
    assert first.done()  # save_async returned only after the first save had finished
    assert second.wait(WAIT).step == 2
    assert [i.step for i in store.list()] == [1, 2]


def test_an_unseen_background_error_is_raised_by_the_next_save(memory_location: Location) -> None:
    store = memory_location.store()
    store.save_async(1, {"x": torch.ones(3)}, generation=3, fence=lambda s: False)
    with pytest.raises(StaleWriterError, match="generation 3"):
        store.save(2, {"x": torch.ones(3)})
    # Reported once: the following save goes ahead.
    assert store.save(2, {"x": torch.ones(3)}).step == 2


def test_an_error_seen_through_wait_is_not_raised_again(memory_location: Location) -> None:
    store = memory_location.store()
    handle = store.save_async(1, {"x": torch.ones(3)}, fence=lambda s: False)
    with pytest.raises(StaleWriterError):
        handle.wait(WAIT)
    with pytest.raises(StaleWriterError):
        handle.wait(WAIT)  # like a Future: the outcome stays
    assert store.save_async(2, {"x": torch.ones(3)}).wait(WAIT).step == 2


def test_store_wait_and_close_surface_the_background_error(memory_location: Location) -> None:
    store = memory_location.store()
    store.save_async(1, {"x": torch.ones(3)}, fence=lambda s: False)
    with pytest.raises(StaleWriterError):
        store.close(timeout=WAIT)
    store.save_async(2, {"x": torch.ones(3)})
    store.close(timeout=WAIT)  # finishes the save before returning
    assert memory_location.store().latest().step == 2


def test_the_snapshot_holds_only_this_ranks_share_of_the_state(memory_location: Location) -> None:
    state = {"big": torch.zeros(1000, dtype=torch.float64), "small": torch.zeros(10)}
    total = 1000 * 8 + 10 * 4
    own = {"rng": torch.zeros(16, dtype=torch.uint8)}
    single = memory_location.store().save_async(1, state)
    assert single.snapshot_bytes == total
    single.wait(WAIT)
    shares = []
    for rank in (1, 2, 3, 0):  # the committer last: the other parts are already there
        handle = memory_location.store().save_async(
            2, state, rank=rank, world_size=4, per_rank_state=own, timeout=WAIT
        )
        shares.append(handle.snapshot_bytes)
        assert handle.wait(WAIT).committed == (rank == 0)
    assert shares == [total // 4 + 16] * 4


def test_back_to_back_async_saves_reuse_one_snapshot_buffer_without_mixing_steps(
    memory_location: Location,
) -> None:
    # The kept buffer is overwritten by the next snapshot: that must only happen once
    # the previous save has stopped reading it.  The first write of step 1 is slowed
    # down, so a second snapshot taken too early would land while step 1 is still
    # being written, and step 1 would hold step 2's bytes (with matching checksums).
    from chaos.faultfs import Fault, FaultPlan, FaultyFileSystem

    slow = FaultyFileSystem(
        memory_location.fs, FaultPlan((Fault.delay(0.5, ops="write", path="*step-*1/*"),))
    )
    store = memory_location.store(fs=slow)
    state = {"w": torch.arange(4096, dtype=torch.float32)}
    first = store.save_async(1, state, timeout=WAIT)
    buffer_after_first = store._staging.nbytes
    state["w"].add_(1000.0)
    second = store.save_async(2, state, timeout=WAIT)
    assert first.done() and first.wait(WAIT).step == 1
    second.wait(WAIT)
    assert buffer_after_first == store._staging.nbytes == 4096 * 4
    assert slow.count("write") >= 2
    reader = memory_location.store()
    assert torch.equal(reader.load(step=1)[1]["w"], torch.arange(4096, dtype=torch.float32))
    assert torch.equal(reader.load(step=2)[1]["w"], torch.arange(4096, dtype=torch.float32) + 1000)


def test_the_snapshot_buffer_is_kept_between_saves_only_when_configured(
    memory_location: Location,
) -> None:
    from storage.store import StoreConfig

    kept = memory_location.store()
    kept.save_async(1, {"x": torch.ones(256)}).wait(WAIT)
    assert kept._staging.nbytes == 256 * 4
    kept.close(timeout=WAIT)
    assert kept._staging.nbytes == 0  # close() lets the memory go
    fresh = memory_location.store(config=StoreConfig(keep_snapshot_buffer=False))
    fresh.save_async(2, {"x": torch.ones(256)}).wait(WAIT)
    assert fresh._staging.nbytes == 0
    assert torch.equal(memory_location.store().load()[1]["x"], torch.ones(256))
    with pytest.raises(Exception, match="keep_snapshot_buffer must be a bool"):
        StoreConfig(keep_snapshot_buffer="yes")
