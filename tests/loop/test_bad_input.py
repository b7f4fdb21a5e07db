"""Misuse of the loop API is a clear error naming it (a one-worker job on its own etcd)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from elastic.base.errors import ConfigError

DATA = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))


def _setup(job):
    model = torch.nn.Linear(4, 1)
    raw = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, raw, job.optimizer(raw, model)


def _backward(model, batch):
    x, y = batch
    torch.nn.functional.mse_loss(model(x), y).backward()


def test_stepping_the_unwrapped_optimizer_is_refused(job):
    model, raw, _opt = _setup(job)
    for batch in job.loader(DATA, global_batch_size=8):
        _backward(model, batch)
        with pytest.raises(ConfigError, match="step the optimizer job.optimizer\\(\\) returned"):
            raw.step()
        break


def test_parameters_added_after_wrapping_are_refused(job):
    model, raw, opt = _setup(job)
    for batch in job.loader(DATA, global_batch_size=8):
        raw.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        _backward(model, batch)
        with pytest.raises(ConfigError, match="changed after job.optimizer\\(\\) wrapped it"):
            opt.step()
        break


def test_a_per_rank_batch_size_is_refused(job):
    _setup(job)
    with pytest.raises(ConfigError, match="batch_size=8 is a per-rank size"):
        job.loader(DATA, global_batch_size=32, batch_size=8)


def test_a_step_before_the_loader_is_refused(job):
    _model, _raw, opt = _setup(job)
    job.loader(DATA, global_batch_size=8)
    with pytest.raises(ConfigError, match="outside the loader's loop"):
        opt.step()


def test_unused_micro_batches_are_refused(job):
    model, _raw, opt = _setup(job)
    for micro in job.loader(DATA, global_batch_size=8, micro_batches=4):
        _backward(model, next(iter(micro)))
        with pytest.raises(ConfigError, match="used 1 of its 4 micro-batches"):
            opt.step()
        break


def test_a_plain_loop_alone_trains_and_a_scheduler_is_state(job):
    model, raw, opt = _setup(job)
    sched = torch.optim.lr_scheduler.StepLR(raw, step_size=2, gamma=0.5)
    state = job.state(scheduler=sched, epoch=0)
    for batch in job.loader(DATA, global_batch_size=8, epochs=2):
        _backward(model, batch)
        opt.step()
        sched.step()
        opt.zero_grad()
        if job.every(4):
            state.epoch += 1
    assert job.step == 8 and job.final
    assert state.epoch == 2
    assert raw.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)
    saved = job.registry.checkpoint_dict()
    assert saved["scheduler"]["last_epoch"] == 8 and saved["values"] == {"epoch": 2}


def test_state_refuses_what_it_cannot_carry(job):
    with pytest.raises(ConfigError, match="state_dict"):
        job.state(callback=lambda: None)
