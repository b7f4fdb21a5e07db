"""Unit tests of the shard partition and placement (issue 14, pure logic)."""

from __future__ import annotations

import random

import pytest

from elastic.base.errors import ConfigError
from elastic.train.placement import (
    Param,
    Piece,
    Shard,
    check_coverage,
    lost_shards,
    moved_bytes,
    partition,
    place,
)

PARAMS = [
    Param("fc1.weight", "float32", 4096, 4),
    Param("fc1.bias", "float32", 64, 4),
    Param("fc2.weight", "float32", 1000, 4),
    Param("emb.weight", "bfloat16", 3000, 2),
]


def test_partition_covers_every_element_once_and_balances_bytes():
    shards = partition(PARAMS, 8)
    check_coverage(PARAMS, shards)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert all(len({p.name for p in s.pieces}) == len(s.pieces) for s in shards)
    for dtype in ("float32", "bfloat16"):
        sizes = [s.nbytes for s in shards if s.dtype == dtype]
        assert max(sizes) - min(sizes) <= 4  # one element apart at most
    # A tensor larger than a shard is split at element boundaries.
    assert sum(1 for s in shards for p in s.pieces if p.name == "fc1.weight") > 1


def test_partition_ignores_the_order_it_is_given():
    shuffled = list(PARAMS)
    random.Random(3).shuffle(shuffled)
    assert partition(shuffled, 5) == partition(PARAMS, 5)


def test_partition_rejects_nonsense():
    with pytest.raises(ConfigError, match="at least 1"):
        partition(PARAMS, 0)
    with pytest.raises(ConfigError, match="unique"):
        partition(PARAMS + [PARAMS[0]], 4)


def test_coverage_names_the_gap_the_overlap_and_the_stranger():
    shards = partition(PARAMS, 4)
    with pytest.raises(ConfigError, match="do not cover parameter|a gap"):
        check_coverage(PARAMS, shards[1:])
    last = Shard(99, "float32", (Piece("fc2.weight", 0, 999),), 3996)
    with pytest.raises(ConfigError, match="'fc2.weight': elements 999..1000 missing"):
        check_coverage(PARAMS[2:3], [last])
    dup = Shard(99, "float32", (Piece("fc1.bias", 0, 10),), 40)
    with pytest.raises(ConfigError, match="overlap"):
        check_coverage(PARAMS, shards + [dup])
    stranger = Shard(99, "float32", (Piece("nope", 0, 1),), 4)
    with pytest.raises(ConfigError, match="nope"):
        check_coverage(PARAMS, shards + [stranger])


def _owners(n, hosts=None):
    return {f"m{i}": f"h{i % (hosts or n)}" for i in range(n)}


def _load(shards, placement):
    size = {s.index: s.nbytes for s in shards}
    load = {}
    for i, owners in placement.items():
        for m in owners:
            load[m] = load.get(m, 0) + size[i]
    return load


def test_every_shard_gets_k_distinct_owners_on_different_hosts_when_possible():
    shards = partition(PARAMS, 16)
    owners = _owners(4, hosts=2)
    placement = place(shards, owners, 2)
    assert set(placement) == {s.index for s in shards}
    for copies in placement.values():
        assert len(set(copies)) == 2
        assert len({owners[m] for m in copies}) == 2  # two hosts hold each shard
    load = _load(shards, placement)
    biggest = max(s.nbytes for s in shards)
    assert max(load.values()) - min(load.values()) <= biggest


def test_placement_is_a_function_of_its_arguments():
    shards = partition(PARAMS, 12)
    a = place(shards, _owners(3), 2)
    b = place(shards, dict(reversed(list(_owners(3).items()))), 2)
    assert a == b


def test_a_lost_owner_moves_only_its_copies_and_nothing_is_lost_with_k2():
    shards = partition(PARAMS, 16)
    before = place(shards, _owners(4), 2)
    alive = _owners(4)
    del alive["m2"]
    assert lost_shards(before, set(alive)) == []
    after = place(shards, alive, 2, previous=before)
    held_by_m2 = sum(s.nbytes for s in shards if "m2" in before[s.index])
    assert moved_bytes(shards, before, after) == held_by_m2
    for i, copies in after.items():
        assert set(before[i]) - {"m2"} <= set(copies)  # survivors' copies stay


def test_a_join_takes_a_share_and_moves_little():
    shards = partition(PARAMS, 24)
    before = place(shards, _owners(3), 2)
    after = place(shards, _owners(4), 2, previous=before)
    load = _load(shards, after)
    assert load.get("m3", 0) > 0
    total = sum(s.nbytes for s in shards) * 2
    # Roughly the joiner's share moves, not the whole state.
    assert moved_bytes(shards, before, after) <= total / 4 + max(s.nbytes for s in shards) * 2


def test_both_copies_gone_is_reported_as_lost():
    shards = partition(PARAMS, 8)
    placement = place(shards, _owners(3), 2)
    victims = set(placement[0])
    lost = lost_shards(placement, set(_owners(3)) - victims)
    assert 0 in lost


def test_more_replicas_than_owners_is_refused_naming_both():
    with pytest.raises(ConfigError, match="--replicas 3 is more than the 2 owner"):
        place(partition(PARAMS, 4), _owners(2), 3)
    with pytest.raises(ConfigError, match="at least 1"):
        place(partition(PARAMS, 4), _owners(2), 0)
