"""Retention decisions: which committed steps to keep, which leftovers are garbage.

Pure functions; the store performs the deletions (manifest first, so that a
crash half-way through a deletion leaves an uncommitted leftover, never a torn
checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterable

from storage.errors import InvalidArgumentError


def check_retention(keep_last: int, keep_every: int | None) -> None:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise InvalidArgumentError(f"keep_last must be an int >= 1, got {keep_last!r}")
    if keep_every is not None and (
        isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1
    ):
        raise InvalidArgumentError(f"keep_every must be None or an int >= 1, got {keep_every!r}")


def steps_to_keep(
    steps: Iterable[int], keep_last: int, keep_every: int | None, protect: int | None
) -> set[int]:
    """The last `keep_last` steps, every step divisible by `keep_every`, and `protect`
    (the newest checkpoint that verifies, which is never deleted)."""
    check_retention(keep_last, keep_every)
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:])
    if keep_every is not None:
        keep.update(s for s in ordered if s % keep_every == 0)
    if protect is not None:
        keep.add(protect)
    return keep


def leftover_is_garbage(
    *,
    step: int,
    generation: int | None,
    newest_mtime: float | None,
    now: float,
    grace_s: float,
    newest_step: int | None,
    newest_generation: int | None,
) -> bool:
    """Whether uncommitted files of (step, generation) can no longer become a checkpoint.

    They can be deleted when they come from a generation older than the newest
    committed one (fencing refuses that writer's commit), when they belong to a
    step older than the newest committed step (writers only move forward), or
    when nothing has touched them for `grace_s` seconds (their writer is gone).
    Files whose age is unknown are kept unless one of the first two rules applies.
    """
    if newest_generation is not None and generation is not None and generation < newest_generation:
        return True
    if newest_step is not None and step < newest_step:
        return True
    return newest_mtime is not None and now - newest_mtime >= grace_s
