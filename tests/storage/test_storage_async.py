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
