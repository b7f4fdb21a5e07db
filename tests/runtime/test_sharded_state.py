"""Sharded optimizer state, the logic of one rank (elastic/train/sharded.py).

The multi-process behaviour (kills, joins, restores, resumes at other sizes)
is in tests/loop/test_sharded.py with real workers; here: the update by
slices is the replicated update, a checkpoint's parts assemble back into the
optimizer's own state, and nonsense is refused naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from elastic.base.errors import ConfigError
from elastic.train.sharded import ShardedState, ShardLostError, assemble
from storage.shards import META_KEY, SHARDS_KEY, with_full_optimizer


class OneRank:
    """A World of one rank: every collective is the identity."""

    rank, size = 0, 1

    def all_gather_int(self, value: int) -> list[int]:
        return [value]

    def all_reduce(self, tensor, watch=None) -> None:
        pass

    def broadcast(self, tensor, src) -> None:
        pass

    def broadcast_bytes(self, payload, src) -> bytes:
        return payload


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _grads(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("kind", ["AdamW", "SGD", "RMSprop"])
def test_the_update_by_slices_is_bitwise_the_replicated_update(kind):
    opts = {"AdamW": dict(lr=0.01, weight_decay=0.1), "SGD": dict(lr=0.1, momentum=0.9)}
    make = getattr(torch.optim, kind)
    ref, mine = _model(), _model()
    ref_opt = make(ref.parameters(), **opts.get(kind, dict(lr=0.01)))
    opt = make(mine.parameters(), **opts.get(kind, dict(lr=0.01)))
    sh = ShardedState(opt, replicas=1, shards=5)  # shards cut through the tensors
    assert any(len(s.pieces) > 1 for s in sh.shards) or len(sh.shards) > 4
    sh.reform(OneRank(), [("a", "h")], my_step=0)
    for step in range(4):
        _grads(ref, step)
        _grads(mine, step)
        ref_opt.step()
        sh.apply()
        sh.exchange_params(OneRank(), sh.step_sources({"a": 0}))
    for a, b in zip(ref.parameters(), mine.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state == {}, "the wrapped optimizer holds no state"
    # The same elementwise state (each piece adds its own step count, 4 bytes).
    ref_bytes = sum(
        v.numel() * v.element_size()
        for st in ref_opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim()
    )
    extra_pieces = sum(len(s.pieces) for s in sh.shards) - len(ref_opt.state)
    assert ref_bytes <= sh.state_bytes() <= ref_bytes + 4 * (len(ref_opt.state) + extra_pieces)


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(2):
        _grads(model, step)
        opt.step()
    return model, opt


def test_a_checkpoints_shard_parts_assemble_into_the_optimizers_own_state():
    model, opt = _trained()
    full = opt.state_dict()["state"]
    fresh = torch.optim.AdamW(_model().parameters(), lr=0.01)
    sh = ShardedState(fresh, replicas=1, shards=4)
    sh.load_full(full, step=2)
    sh.reform(OneRank(), [("a", "h")], my_step=2)
    back = assemble([sh.part("a")], [p for g in fresh.param_groups for p in g["params"]])
    assert sorted(back) == sorted(full)
    for index, st in full.items():
        for key, value in st.items():
            assert torch.equal(back[index][key], value), (index, key)


def test_parts_that_leave_a_gap_or_overlap_or_name_strangers_are_refused():
    model, opt = _trained()
    params = [p for g in opt.param_groups for p in g["params"]]
    sh = ShardedState(torch.optim.AdamW(_model().parameters()), replicas=1, shards=4)
    sh.load_full(opt.state_dict()["state"], step=2)
    sh.reform(OneRank(), [("a", "h")], my_step=2)
    part = sh.part("a")
    gap = dict(part)
    del gap[sorted(gap)[1]]
    with pytest.raises(ConfigError, match="do not cover parameter|leave a gap"):
        assemble([gap], params)
    with pytest.raises(ConfigError, match="overlap"):
        assemble([part, {sorted(part)[0]: part[sorted(part)[0]]}], params)
    with pytest.raises(ConfigError, match="lacks"):
        assemble([part, {"0000099:0:1": {}}], params)
    with pytest.raises(ConfigError, match="NAME:START:STOP"):
        assemble([{"nonsense": {}}], params)


def test_an_optimizer_that_is_not_elementwise_is_refused_by_name():
    opt = torch.optim.LBFGS(_model().parameters())
    with pytest.raises(ConfigError, match="LBFGS is not one of them"):
        ShardedState(opt, replicas=2, shards=4)


@pytest.mark.parametrize("replicas,shards", [(0, 4), (2, 0), (2, 63)])
def test_nonsense_counts_are_refused(replicas, shards):
    with pytest.raises(ConfigError):
        ShardedState(
            torch.optim.SGD(_model().parameters(), lr=0.1), replicas=replicas, shards=shards
        )


def test_a_shard_without_any_copy_and_no_checkpoint_is_a_clear_error():
    _, opt = _trained()
    sh = ShardedState(opt, replicas=1, shards=4)
    # Step 5 reached, and nobody holds the shards (their owners died).
    with pytest.raises(ShardLostError, match="lost every one of their 1 copies"):
        sh.reform(OneRank(), [("a", "h")], my_step=5)


def test_a_sharded_checkpoints_optimizer_state_is_joined_for_an_export():
    """What `elastic ckpt export` writes for a sharded checkpoint: the optimizer
    entry's state joined from the ranks' parts, bitwise the replicated state."""
    model, opt = _trained()
    full = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    sh = ShardedState(torch.optim.AdamW(_model().parameters()), replicas=1, shards=4)
    sh.load_full(full["state"], step=2)
    sh.reform(OneRank(), [("a", "h")], my_step=2)
    meta = {"optimizer": "opt", "shapes": [list(p.shape) for p in params]}
    # The pieces as two ranks would write them, each its own half.
    keys = sorted(sh.part("a"))
    halves = [{k: sh.part("a")[k] for k in keys[::2]}, {k: sh.part("a")[k] for k in keys[1::2]}]
    per_rank = {r: {SHARDS_KEY: half, META_KEY: meta} for r, half in enumerate(halves)}
    replicated = {"model": model.state_dict(), "opt": {**full, "state": {}}}
    joined, note = with_full_optimizer(replicated, per_rank)
    assert note is None
    assert sorted(joined["opt"]["state"]) == sorted(full["state"])
    for index, st in full["state"].items():
        for key, value in st.items():
            assert torch.equal(joined["opt"]["state"][index][key], value), (index, key)
    # A checkpoint written before the names were recorded: said, not guessed.
    _, note = with_full_optimizer(replicated, {0: {SHARDS_KEY: sh.part("a")}})
    assert note and "names no optimizer" in note
    # Nothing sharded: the state as it was.
    assert with_full_optimizer(replicated, {0: {}}) == (replicated, None)
