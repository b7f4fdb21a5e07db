"""Several optimizers, param groups and frozen parameters: the same updates as plain torch
(a one-worker job on its own etcd, so the averaged gradient is the local one)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

DATA = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    frozen = torch.nn.Linear(8, 8)  # an embedding kept fixed
    frozen.requires_grad_(False)
    first, last = model[0], model[2]
    sgd = torch.optim.SGD(
        [{"params": [first.weight], "lr": 0.1}, {"params": [first.bias], "lr": 0.01}],
        momentum=0.9,
    )
    adam = torch.optim.Adam(last.parameters(), lr=1e-2)
    return model, frozen, sgd, adam


def _loss(model, frozen, x, y):
    return torch.nn.functional.mse_loss(model(frozen(x)), y)


def test_two_optimizers_param_groups_and_a_frozen_layer_match_plain_torch(job):
    ref_model, ref_frozen, ref_sgd, ref_adam = _setup()
    model, frozen, sgd, adam = _setup()
    sgd_w = job.optimizer(sgd, model)
    adam_w = job.optimizer(adam)
    loader = job.loader(DATA, global_batch_size=16, epochs=2, shuffle=False)
    steps = 0
    for x, y in loader:
        sgd_w.zero_grad()
        adam_w.zero_grad()
        _loss(model, frozen, x, y).backward()
        sgd_w.step()
        adam_w.step()
        # The same batch through plain torch.
        ref_sgd.zero_grad()
        ref_adam.zero_grad()
        _loss(ref_model, ref_frozen, x, y).backward()
        ref_sgd.step()
        ref_adam.step()
        steps += 1
    assert steps == 8
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in frozen.parameters())
    assert torch.equal(frozen.weight, ref_frozen.weight)
