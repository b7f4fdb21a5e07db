"""StepGradients: the weighted gradient sum, in place in the all-reduce buffer or exact."""

from __future__ import annotations

import pytest
import torch

from elastic.base.errors import ConfigError, WorkerGroupError
from elastic.train.grads import StepGradients

CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _grads_of(model, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


class Wire:
    """Stands in for the group: records each all-reduce started (the slices, in
    order); a sum over one rank leaves them as they are."""

    def __init__(self) -> None:
        self.started: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.started.append(t)
        return t


def _exchange(g: StepGradients, loss: float = 0.0, computed: bool = True) -> torch.Tensor:
    g.exchange(loss, computed, launch=Wire())
    return g.buf


def _unreverse(model, flat) -> list[torch.Tensor]:
    # The buffer holds the last parameters first.
    params = list(reversed(list(model.parameters())))
    parts = torch.split(flat[:-1], [p.numel() for p in params])
    return list(reversed(parts))


def _run(model, batches, weights, exact, bucket_bytes=1 << 20):
    params = list(model.parameters())
    g = StepGradients(params, exact=exact, device=CPU, bucket_bytes=bucket_bytes)
    g.begin()
    wire = Wire()
    for i, ((x, y), w) in enumerate(zip(batches, weights, strict=True)):
        if i:
            g.fold(weights[i - 1])
        g.prepare(w)
        if i == len(weights) - 1:
            g.overlap(wire)
        torch.nn.functional.mse_loss(model(x), y).backward()
    g.fold(weights[-1])
    g.exchange(1.5, True, launch=wire)
    return g, g.buf, wire


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
    g, flat, _ = _run(model, batches, weights, exact)
    got = _unreverse(model, flat)
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
    flat = _exchange(g)
    flat.mul_(2.0)  # what an all-reduce of two equal ranks does, in place
    assert torch.equal(params[0].grad.reshape(-1), _unreverse(model, flat)[0])
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
    flat = _exchange(g)
    for a, b in zip(_unreverse(model, flat), want, strict=True):
        torch.testing.assert_close(a, b.reshape(-1))


def test_a_failed_exchange_leaves_the_old_buffer_to_the_abandoned_collective():
    model = _model()
    params = list(model.parameters())
    g = StepGradients(params, exact=False, device=CPU)
    g.begin()
    torch.nn.functional.mse_loss(model(torch.randn(3, 5)), torch.randn(3, 2)).backward()
    old = _exchange(g)
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
    assert not _exchange(g, computed=False).any()


def _wide() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))


def test_buckets_start_during_backward_in_order_and_the_loss_bucket_at_the_exchange():
    model = _wide()  # 4 layers of 16.6 KB: 4 KB buckets, one per tensor or so
    g, flat, wire = _run(
        model, [(torch.randn(8, 64), torch.randn(8, 64))], [1.0], False, bucket_bytes=4096
    )
    buckets = len(g._buckets)
    assert buckets >= 4  # a weight and the next layer's bias each
    assert len(wire.started) == buckets  # every bucket, each once
    offsets = [t.data_ptr() for t in wire.started]
    assert offsets == sorted(offsets)  # in buffer order, the last layers first
    assert wire.started[-1].numel() - 1 >= 0 and wire.started[-1][-1] == 1.5  # the loss slot


def test_buckets_started_from_backward_are_not_scaled_twice():
    model = _wide()
    x, y = torch.randn(8, 64), torch.randn(8, 64)
    want = _grads_of(model, x, y)
    model.zero_grad(set_to_none=True)
    _, flat, _ = _run(model, [(x, y)], [0.25], False, bucket_bytes=4096)
    for a, b in zip(_unreverse(model, flat), want, strict=True):
        torch.testing.assert_close(a, 0.25 * b.reshape(-1))


def test_two_backward_passes_in_the_last_micro_batch_are_refused():
    model = _wide()
    g = StepGradients(list(model.parameters()), exact=False, device=CPU, bucket_bytes=4096)
    g.begin()
    g.prepare(1.0)
    g.overlap(Wire())
    x = torch.randn(8, 64)
    model(x).sum().backward()
    model(x).sum().backward()
    with pytest.raises(ConfigError, match="accumulated twice"):
        g.exchange(0.0, True, launch=Wire())


def test_a_failure_to_start_a_bucket_in_backward_is_raised_at_the_exchange():
    model = _wide()
    g = StepGradients(list(model.parameters()), exact=False, device=CPU, bucket_bytes=4096)
    g.begin()
    g.prepare(1.0)

    def broken(t):
        raise WorkerGroupError("peer gone")

    g.overlap(broken)
    model(torch.randn(8, 64)).sum().backward()  # does not raise inside backward
    with pytest.raises(WorkerGroupError, match="peer gone"):
        g.exchange(0.0, True, launch=Wire())


def test_every_bucket_but_the_last_has_started_when_backward_ends():
    model = _wide()
    g = StepGradients(list(model.parameters()), exact=False, device=CPU, bucket_bytes=4096)
    g.begin()
    g.prepare(1.0)
    wire = Wire()
    g.overlap(wire)
    model(torch.randn(8, 64)).sum().backward()
    assert len(wire.started) == len(g._buckets) - 1  # overlapped with backward
    g.exchange(0.0, True, launch=wire)
    assert len(wire.started) == len(g._buckets)
