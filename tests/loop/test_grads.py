"""StepGradients: the weighted gradient sum, in place in the all-reduce buffer or exact."""

from __future__ import annotations

import pytest
import torch

from elastic.train.grads import StepGradients

CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _grads_of(model, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _run(model, batches, weights, exact) -> tuple[StepGradients, torch.Tensor]:
    params = list(model.parameters())
    g = StepGradients(params, exact=exact, device=CPU)
    g.begin()
    for i, ((x, y), w) in enumerate(zip(batches, weights, strict=True)):
        if i:
            g.fold(weights[i - 1])
        g.prepare(w)
        torch.nn.functional.mse_loss(model(x), y).backward()
    g.fold(weights[-1])
    flat = g.finish(1.5, computed=True)
    return g, flat


@pytest.mark.parametrize("exact", [False, True], ids=["in-place", "exact"])
@pytest.mark.parametrize("weights", [[0.25, 0.25], [0.3, 0.2, 0.1]], ids=["equal", "unequal"])
def test_the_buffer_is_the_weighted_sum_of_the_micro_batch_gradients(exact, weights):
    model = _model()
    batches = [(torch.randn(4, 5), torch.randn(4, 2)) for _ in weights]
    want = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for (x, y), w in zip(batches, weights, strict=True):
        for acc, gr in zip(want, _grads_of(model, x, y), strict=True):
            acc.add_(gr.double(), alpha=w)
    model.zero_grad(set_to_none=True)
    g, flat = _run(model, batches, weights, exact)
    got = torch.split(flat[:-1], [p.numel() for p in model.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.reshape(-1), rtol=1e-6, atol=1e-7)
    assert flat[-1] == 1.5  # the loss slot, not scaled
    g.averaged()
    for p, a in zip(model.parameters(), got, strict=True):
        torch.testing.assert_close(p.grad.reshape(-1), a.to(p.dtype))


def test_in_place_gradients_are_views_of_the_buffer_and_zero_grad_keeps_them():
    model = _model()
    params = list(model.parameters())
    g = StepGradients(params, exact=False, device=CPU)
    g.begin()
    torch.nn.functional.mse_loss(model(torch.randn(3, 5)), torch.randn(3, 2)).backward()
    buf_ptr = g.buf.data_ptr()
    assert all(p.grad.data_ptr() >= buf_ptr for p in params)
    flat = g.finish(0.0, computed=True)
    flat.mul_(2.0)  # what an all-reduce of two equal ranks does, in place
    assert torch.equal(params[0].grad.reshape(-1), flat[: params[0].numel()])
    assert g.zero(params) == []  # zeroed in place
    assert all(p.grad is not None and not p.grad.any() for p in params)


def test_a_gradient_the_script_replaced_is_still_counted():
    model = _model()
    params = list(model.parameters())
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    want = _grads_of(model, x, y)
    model.zero_grad(set_to_none=True)
    g = StepGradients(params, exact=False, device=CPU)
    g.begin()
    model.zero_grad(set_to_none=True)  # the module's own zero_grad drops the views
    torch.nn.functional.mse_loss(model(x), y).backward()
    g.prepare(1.0)
    g.fold(1.0)
    flat = g.finish(0.0, computed=True)
    torch.testing.assert_close(flat[:-1], torch.cat([w.reshape(-1) for w in want]))


def test_a_failed_exchange_leaves_the_old_buffer_to_the_abandoned_collective():
    model = _model()
    params = list(model.parameters())
    g = StepGradients(params, exact=False, device=CPU)
    g.begin()
    torch.nn.functional.mse_loss(model(torch.randn(3, 5)), torch.randn(3, 2)).backward()
    old = g.finish(0.0, computed=True)
    g.failed()
    old.fill_(7.0)  # a late write of the parked collective
    assert g.buf.data_ptr() != old.data_ptr()
    assert all(not p.grad.any() for p in params)
    g.begin()
    assert all(not p.grad.any() for p in params)


def test_a_rank_without_a_share_contributes_zeros():
    model = _model()
    g = StepGradients(list(model.parameters()), exact=False, device=CPU)
    g.begin()
    torch.nn.functional.mse_loss(model(torch.randn(3, 5)), torch.randn(3, 2)).backward()
    assert not g.finish(0.0, computed=False).any()
