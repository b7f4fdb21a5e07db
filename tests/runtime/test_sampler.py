"""ElasticSampler: exactly once per epoch whatever the sequence of world sizes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from elastic.base.errors import ConfigError
from elastic.train.sampler import ElasticSampler


def consume_epoch(sampler: ElasticSampler, world_sizes, use_micro: int | None = None):
    """Run one epoch, changing the world size at random steps; return ids seen."""
    seen: Counter[int] = Counter()
    epoch = sampler.epoch
    step = 0
    while sampler.epoch == epoch:
        w = world_sizes(step)
        batch_ids = []
        for r in range(w):
            if use_micro:
                parts, b = sampler.micro_shards(r, w, use_micro)
                ids = [i for p in parts for i in p]
            else:
                ids, b = sampler.share(r, w)
            batch_ids.extend(ids)
        assert sorted(batch_ids) == sorted(sampler.global_batch())
        assert b == len(sampler.global_batch())
        seen.update(batch_ids)
        sampler.advance()
        step += 1
    return seen


@pytest.mark.parametrize("micro", [None, 4])
@pytest.mark.parametrize("n,batch", [(100, 8), (101, 7), (64, 64), (5, 8)])
def test_every_sample_exactly_once_under_changing_worlds(n, batch, micro):
    rng = random.Random(n * batch)
    s = ElasticSampler(n, batch, seed=3)
    for _ in range(3):
        seen = consume_epoch(s, lambda _step: rng.randint(1, 9), micro)
        assert set(seen) == set(range(n))
        assert max(seen.values()) == 1


def test_order_depends_on_seed_and_epoch_only():
    a, b = ElasticSampler(50, 10, seed=1), ElasticSampler(50, 10, seed=1)
    c = ElasticSampler(50, 10, seed=2)
    assert a.global_batch() == b.global_batch()
    assert a.global_batch() != c.global_batch()
    first = a.global_batch()
    for _ in range(5):
        a.advance()
    assert a.epoch == 1 and a.global_batch() != first


def test_state_dict_resumes_mid_epoch_and_refuses_another_data_order():
    a = ElasticSampler(30, 4, seed=5)
    for _ in range(3):
        a.advance()
    b = ElasticSampler(30, 4, seed=5)
    b.load_state_dict(a.state_dict())
    assert b.global_batch() == a.global_batch()
    with pytest.raises(ConfigError, match="global_batch_size=4 but this run uses 8"):
        ElasticSampler(30, 8, seed=5).load_state_dict(a.state_dict())


def test_shares_differ_by_at_most_one_and_extra_ranks_get_nothing():
    s = ElasticSampler(10, 5, shuffle=False)
    sizes = [len(s.share(r, 3)[0]) for r in range(3)]
    assert sorted(sizes) == [1, 2, 2]
    assert [len(s.share(r, 7)[0]) for r in range(7)].count(0) == 2


def test_micro_shards_are_the_same_cuts_for_any_world_size():
    s = ElasticSampler(64, 16, seed=0)

    def cuts(w):
        return [tuple(p) for r in range(w) for p in s.micro_shards(r, w, 4)[0]]

    assert cuts(1) == cuts(2) == cuts(3) == cuts(4)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(dataset_size=0, global_batch_size=4), "dataset is empty"),
        (dict(dataset_size=4, global_batch_size=0), "global_batch_size must be >= 1"),
        (dict(dataset_size=4, global_batch_size=8, drop_last=True), "leaves no batch"),
    ],
)
def test_invalid_settings_are_named(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        ElasticSampler(**kwargs)
