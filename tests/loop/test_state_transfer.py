"""Peer sync moves optimizer state as tensors: only a small skeleton is serialized."""

from __future__ import annotations

import io

import torch

from elastic.train.state import _allocate, _fill, _skeleton


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 256)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_optimizer_state_round_trips_through_skeleton_and_flat_tensors():
    _, opt, sched = _trained()
    rest = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 3}
    tensors: list[torch.Tensor] = []
    buf = io.BytesIO()
    torch.save(_skeleton(rest, tensors), buf)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    assert state_bytes > 500_000  # exp_avg and exp_avg_sq of 65,792 parameters
    assert len(buf.getvalue()) < 10_000  # the skeleton carries none of them

    # The receiver: allocate from the skeleton's index, fill (as the broadcast
    # does), rebuild, load into a fresh optimizer of the same model shape.
    skeleton = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    received = _allocate(skeleton["meta"], torch.device("cpu"))
    for dst, src in zip(received, tensors, strict=True):
        assert dst.shape == src.shape and dst.dtype == src.dtype
        dst.copy_(src)
    got = _fill(skeleton["tree"], received)
    model2 = torch.nn.Linear(256, 256)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(got["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(opt2.state_dict()["state"][k][name], t), (k, name)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    assert got["scheduler"] == sched.state_dict() and got["step"] == 3


def test_a_survivor_receives_into_its_own_state_tensors_and_a_joiner_allocates():
    from elastic.train.state import JobState

    _, src_opt, _ = _trained()
    src = _skeleton({"optimizer": src_opt.state_dict()}, [])
    _, own_opt, _ = _trained()  # same shapes: a survivor one step behind
    state = JobState().register(optimizer=own_opt)
    got = state._receive_into(src, torch.device("cpu"))
    own_ptrs = {t.data_ptr() for st in own_opt.state.values() for t in st.values()}
    assert {t.data_ptr() for t in got} == own_ptrs  # in place: no allocation

    fresh = torch.optim.AdamW(torch.nn.Linear(256, 256).parameters())  # no state yet
    joiner = JobState().register(optimizer=fresh)
    new = joiner._receive_into(src, torch.device("cpu"))
    assert len(new) == len(src["meta"]) and not {t.data_ptr() for t in new} & own_ptrs
