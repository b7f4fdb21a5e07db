"""The optimizer of a script's own loop, wrapped: its step applies averaged gradients or nothing.

``job.optimizer(opt)`` returns an :class:`ElasticOptimizer`. Its ``step()``
first completes the step's gradient exchange (once per step, however many
optimizers are wrapped; :meth:`Job.clip_grad_norm_` may have done it already),
then runs the wrapped optimizer only if the exchange succeeded on this rank.
A failed step therefore changes no parameter; the job puts the rest back at
the next step boundary and the loader hands the same global batch out again.

Stepping the wrapped optimizer itself (the object passed in) would apply a
local gradient on one rank: a step pre-hook refuses it with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from ..base.errors import ConfigError


class ElasticOptimizer:
    """Delegates to the wrapped optimizer except for ``step``."""

    def __init__(self, job: Any, optimizer: torch.optim.Optimizer) -> None:  # job: the Job
        if isinstance(optimizer, ElasticOptimizer):
            raise ConfigError("this optimizer is wrapped already (job.optimizer() twice)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"job.optimizer() takes a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self._job = job
        self.optimizer = optimizer
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._stepping = False
        optimizer.register_step_pre_hook(self._refuse_unwrapped)

    def _refuse_unwrapped(self, _opt: Any, _args: Any, _kwargs: Any) -> None:
        if not self._stepping:
            raise ConfigError(
                f"{type(self.optimizer).__name__}.step() was called on the optimizer passed to "
                "job.optimizer(): step the optimizer job.optimizer() returned (the unwrapped one "
                "would apply this rank's local gradient only)"
            )

    def check_params(self) -> None:
        now = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(now) != len(self._params) or any(
            a is not b for a, b in zip(now, self._params, strict=True)
        ):
            raise ConfigError(
                f"the parameters of {type(self.optimizer).__name__} changed after "
                "job.optimizer() wrapped it (add_param_group or a replaced list): wrap the "
                "optimizer after its parameters are final"
            )

    def check_scaler(self, scaler: Any) -> None:
        """Refuse a GradScaler that unscaled this rank's local gradient: its
        inf/NaN check must see the averaged gradient, or ranks would decide
        differently whether to skip the step."""
        states = getattr(scaler, "_per_optimizer_states", {})
        for opt in (self, self.optimizer):
            st = states.get(id(opt))
            if st is not None and st.get("stage") is OptState.UNSCALED:
                raise ConfigError(
                    "scaler.unscale_() ran before the gradients were averaged: call "
                    "job.sync_gradients() first (then unscale_, clip, scaler.step(opt)), so "
                    "the scaler's skip decision is the same on every rank"
                )

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self._params

    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise ConfigError(
                "optimizer.step(closure) is not supported: the closure would recompute a "
                "local loss after the gradient exchange"
            )
        if not self._job.sync_gradients():
            return None  # the step failed: nothing applied here, redone in the new World
        if self._job.sharded:
            # Each owner updates its shards; the wrapped optimizer holds no state.
            self._job.sharded_step()
            return None
        self._stepping = True
        try:
            return self.optimizer.step()
        finally:
            self._stepping = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Not the wrapped optimizer's: it would drop the gradients that are
        # views of the step's all-reduce buffer (elastic/train/grads.py).
        self._job.zero_grad(self, set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        # Anything else (defaults, add_param_group, hooks) is the wrapped one's.
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"ElasticOptimizer({self.optimizer!r})"
