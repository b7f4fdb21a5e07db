"""Retention decisions (pure): which steps to keep, which leftovers are garbage."""

from __future__ import annotations

import pytest

from storage import InvalidArgumentError
from storage.retention import leftover_is_garbage, steps_to_keep


def test_keep_last_n_and_every_kth() -> None:
    steps = [100, 200, 300, 400, 500, 600, 700]
    assert steps_to_keep(steps, 2, None, None) == {600, 700}
    assert steps_to_keep(steps, 2, 300, None) == {300, 600, 700}


def test_the_newest_verified_checkpoint_is_always_kept() -> None:
    assert steps_to_keep([1, 2, 3], 1, None, protect=2) == {2, 3}


@pytest.mark.parametrize(("keep_last", "keep_every"), [(0, None), (-1, None), (1, 0), (True, None)])
def test_bad_retention_values_are_named(keep_last: int, keep_every: int | None) -> None:
    with pytest.raises(InvalidArgumentError, match="keep_"):
        steps_to_keep([1], keep_last, keep_every, None)


BASE = {"now": 10_000.0, "grace_s": 600.0, "newest_step": 50, "newest_generation": 4}


@pytest.mark.parametrize(
    ("step", "generation", "mtime", "garbage"),
    [
        (60, 3, 9_999.0, True),  # an older generation: fencing refuses its commit
        (40, 4, 9_999.0, True),  # an older step than the newest commit
        (60, 4, 9_999.0, False),  # newer step, current generation, fresh: maybe in flight
        (60, 5, 9_999.0, False),  # a newer generation is certainly live
        (60, 4, 1_000.0, True),  # untouched for longer than the grace period
        (60, 4, None, False),  # age unknown: kept
        (60, None, 1_000.0, True),  # loose temp files, old
    ],
)
def test_leftovers_of_writers_that_cannot_commit_are_garbage(
    step: int, generation: int | None, mtime: float | None, garbage: bool
) -> None:
    assert (
        leftover_is_garbage(step=step, generation=generation, newest_mtime=mtime, **BASE) is garbage
    )


def test_with_nothing_committed_only_age_counts() -> None:
    args = {"now": 100.0, "grace_s": 10.0, "newest_step": None, "newest_generation": None}
    assert not leftover_is_garbage(step=1, generation=0, newest_mtime=95.0, **args)
    assert leftover_is_garbage(step=1, generation=0, newest_mtime=50.0, **args)
