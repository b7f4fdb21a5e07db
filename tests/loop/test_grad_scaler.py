"""A GradScaler in the loop: its inf check sees the averaged gradient, so every
rank makes the same skip decision (a one-worker job on its own etcd)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from elastic.base.errors import ConfigError

DATA = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))


def _setup(job):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = job.optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    job.state(scaler=scaler)
    return model, opt, scaler


def _scaled_backward(model, scaler, batch):
    x, y = batch
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()


def test_sync_then_unscale_skips_an_inf_step_and_lowers_the_scale(job):
    model, opt, scaler = _setup(job)
    seen = []
    for batch in job.loader(DATA, global_batch_size=8, epochs=1, shuffle=False):
        opt.zero_grad()
        _scaled_backward(model, scaler, batch)
        if job.step == 3:
            model.weight.grad[0, 0] = float("inf")  # an overflow on this step
        before = model.weight.detach().clone()
        job.sync_gradients()  # the averaged gradient: inf if any rank overflowed
        scaler.unscale_(opt)
        job.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        seen.append((job.step, scaler.get_scale(), torch.equal(before, model.weight)))
    assert [s for s, _, _ in seen] == list(range(1, 9))  # the skipped step's samples count
    skipped = [(s, scale) for s, scale, same in seen if same]
    assert skipped == [(4, 2.0**15)], seen  # only that step, and the scale halved


def test_unscale_before_the_gradients_are_averaged_is_refused(job):
    model, opt, scaler = _setup(job)
    for batch in job.loader(DATA, global_batch_size=8):
        opt.zero_grad()
        _scaled_backward(model, scaler, batch)
        scaler.unscale_(opt)  # this rank's local gradient
        with pytest.raises(ConfigError, match="call job.sync_gradients\\(\\) first"):
            scaler.step(opt)
        break
