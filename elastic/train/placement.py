"""Sharded state, part 1 (issue 14): which slice of the state each shard is,
and which members own each shard's k copies.

Pure logic, no processes: the step protocol (reduce-scatter to owners, owner
update, all-gather) and the in-process re-sharding build on it.

The partition depends only on the parameters' names, dtypes and sizes and on
the shard count, never on the World: a new World moves whole shards, and two
runs of the same model cut it the same way. The placement depends only on the
previous placement, the members (with their hosts) and k, so every rank
computes the same one from the World record, with no message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ..base.errors import ConfigError


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of parameter ``name`` (flattened)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    index: int
    dtype: str
    pieces: tuple[Piece, ...]
    nbytes: int


@dataclass(frozen=True)
class Param:
    name: str
    dtype: str
    numel: int
    itemsize: int


def partition(params: Sequence[Param], num_shards: int) -> list[Shard]:
    """Cut ``params`` into about ``num_shards`` shards of about equal bytes.

    Parameters are taken in name order, grouped by dtype (a shard holds one
    dtype, so an owner's slice is one flat buffer); a tensor larger than a
    shard's share is split between shards at element boundaries.
    """
    if num_shards < 1:
        raise ConfigError(f"the shard count must be at least 1, got {num_shards}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ConfigError("parameter names must be unique to be sharded")
    bad = [p.name for p in params if p.numel < 0 or p.itemsize < 1]
    if bad:
        raise ConfigError(f"parameters with an invalid size: {bad}")
    by_dtype: dict[str, list[Param]] = {}
    for p in sorted(params, key=lambda p: p.name):
        if p.numel:
            by_dtype.setdefault(p.dtype, []).append(p)
    total = sum(p.numel * p.itemsize for ps in by_dtype.values() for p in ps)
    shards: list[Shard] = []
    for dtype in sorted(by_dtype):
        group = by_dtype[dtype]
        nbytes = sum(p.numel * p.itemsize for p in group)
        # Each dtype gets a share of the shards by its bytes, at least one.
        count = max(1, round(num_shards * nbytes / total)) if total else 1
        itemsize = group[0].itemsize
        elements = nbytes // itemsize
        bounds = [elements * i // count for i in range(count + 1)]
        for lo, hi in pairwise(bounds):
            if hi > lo:
                pieces = _pieces(group, lo, hi)
                shards.append(Shard(len(shards), dtype, pieces, (hi - lo) * itemsize))
    return shards


def _pieces(group: Sequence[Param], lo: int, hi: int) -> tuple[Piece, ...]:
    """The pieces of elements ``[lo, hi)`` of the group's concatenation."""
    out = []
    offset = 0
    for p in group:
        a, b = max(lo, offset), min(hi, offset + p.numel)
        if b > a:
            out.append(Piece(p.name, a - offset, b - offset))
        offset += p.numel
    return tuple(out)


def check_coverage(params: Sequence[Param], shards: Sequence[Shard]) -> None:
    """ConfigError unless ``shards`` cover every element of every parameter once
    (a checkpoint's shard index, or a placement read from elsewhere)."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for s in shards:
        for piece in s.pieces:
            seen.setdefault(piece.name, []).append((piece.start, piece.stop))
    known = {p.name for p in params}
    extra = sorted(set(seen) - known)
    if extra:
        raise ConfigError(f"shards name parameters the model does not have: {extra}")
    for p in params:
        spans = sorted(seen.get(p.name, []))
        at = 0
        for a, b in spans:
            if a != at:
                what = "overlap" if a < at else "a gap"
                raise ConfigError(f"shards of {p.name!r} leave {what} at element {min(a, at)}")
            at = b
        if at != p.numel:
            raise ConfigError(
                f"shards do not cover parameter {p.name!r}: elements {at}..{p.numel} missing"
            )


Placement = dict[int, tuple[str, ...]]  # shard index -> owner member ids


def place(
    shards: Sequence[Shard],
    owners: Mapping[str, str],
    k: int,
    previous: Placement | None = None,
) -> Placement:
    """Give every shard ``k`` distinct owners among ``owners`` (member id -> host).

    Copies already held by a live owner stay where they are, unless that owner
    carries more than its share by a whole shard; missing copies go to the
    least-loaded owner, preferring a host that holds no copy of the shard yet
    (so one lost host does not take every copy). Ties break by member id: the
    result is a function of the arguments alone.
    """
    if k < 1:
        raise ConfigError(f"--replicas must be at least 1, got {k}")
    if k > len(owners):
        raise ConfigError(
            f"--replicas {k} is more than the {len(owners)} owner(s) of the state "
            f"({sorted(owners)}): each copy of a shard needs its own owner"
        )
    previous = previous or {}
    load = {m: 0 for m in owners}
    total = sum(s.nbytes for s in shards) * k
    share = total / len(owners)
    biggest = max((s.nbytes for s in shards), default=0)
    result: Placement = {}
    # Keep surviving copies, biggest shards first so the cap below is fair.
    order = sorted(shards, key=lambda s: (-s.nbytes, s.index))
    kept: dict[int, list[str]] = {}
    for s in order:
        keep = []
        for m in previous.get(s.index, ()):
            if m in owners and m not in keep and len(keep) < k and load[m] < share + biggest:
                keep.append(m)
                load[m] += s.nbytes
        kept[s.index] = keep
    for s in order:
        chosen = kept[s.index]
        while len(chosen) < k:
            hosts = {owners[m] for m in chosen}
            candidates = [m for m in owners if m not in chosen]
            best = min(candidates, key=lambda m: (owners[m] in hosts, load[m], m))
            chosen.append(best)
            load[best] += s.nbytes
        result[s.index] = tuple(chosen)
    return result


def moved_bytes(shards: Sequence[Shard], before: Placement, after: Placement) -> int:
    """Bytes that must travel to reach ``after`` from ``before`` (new copies)."""
    size = {s.index: s.nbytes for s in shards}
    return sum(size[i] * len(set(owners) - set(before.get(i, ()))) for i, owners in after.items())


def lost_shards(placement: Placement, alive: set[str]) -> list[int]:
    """Shards with no live copy: only these need a checkpoint read."""
    return sorted(i for i, owners in placement.items() if not set(owners) & alive)
