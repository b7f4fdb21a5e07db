"""The Trainer: a loop over ``loss_fn`` written with the job API (:mod:`.job`).

The runtime has one step protocol, the job's; the Trainer is a script's own
loop packaged: the model, optimizer and dataset in, the loop and its result
out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import default_collate

from ..base.errors import ConfigError
from ..base.exitcodes import EXIT_FINISHED, EXIT_LEFT, EXIT_STOPPED
from .config import RuntimeConfig
from .exithook import install_exit_hook
from .job import Job

if TYPE_CHECKING:
    from storage import CheckpointStore


@dataclass(frozen=True)
class FitResult:
    outcome: str  # "finished", "stopped" or "left"
    step: int
    generation: int
    loss: float | None
    # True when this member holds the job's final state: it trained to the last
    # step.  A worker that joins (or is respawned) after the job finished gets
    # outcome "finished" with untrained parameters; it must not publish them.
    final: bool = False

    @property
    def exit_code(self) -> int:
        return {"finished": EXIT_FINISHED, "left": EXIT_LEFT}.get(self.outcome, EXIT_STOPPED)


LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class Trainer:
    """Runs ``loss_fn`` over the dataset on whichever workers are alive.

    ``loss_fn(model, batch)`` returns the mean loss over ``batch`` (the
    runtime weights it by the batch's share of the global batch, so the
    update does not depend on the number of workers).

    ``grad_shards``: cut every global batch into this many fixed micro-batches
    and sum their gradients exactly (in float64), so the update is bitwise the
    same for any number of workers (up to ``grad_shards``). Without it each rank
    takes one backward pass over its share and the float32 sum's rounding
    depends on the world size: harmless for SGD (differences near 1e-7), but
    adaptive optimizers such as Adam amplify it. Costs one backward pass per
    micro-batch and a float64 all-reduce.

    ``checkpoint_store_factory(url, key=key)`` opens the checkpoint location
    (``--checkpoint``) in place of ``storage.CheckpointStore(url, key=key)``:
    to hand the store storage options or a filesystem of its own (the chaos
    workload routes its checkpoint I/O through a fault-injecting one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Sequence[Any],
        *,
        loss_fn: LossFn,
        global_batch_size: int,
        epochs: int = 1,
        max_steps: int | None = None,
        seed: int = 0,
        shuffle: bool | None = None,  # None: True for map-style data, False for a stream
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        config: RuntimeConfig | None = None,
        on_step: Callable[[int, float], None] | None = None,
        grad_shards: int | None = None,
        checkpoint_store_factory: Callable[..., CheckpointStore] | None = None,
    ) -> None:
        install_exit_hook()  # an ElasticError escaping the script: one line, no traceback
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if grad_shards is not None and not 1 <= grad_shards <= global_batch_size:
            raise ConfigError(
                f"grad_shards must be between 1 and global_batch_size ({global_batch_size}), "
                f"got {grad_shards}"
            )
        self.model = model
        self.optimizer = optimizer
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.grad_shards = grad_shards
        self._config = config
        self._loader_options = dict(
            global_batch_size=global_batch_size,
            epochs=epochs,
            max_steps=max_steps,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=collate_fn,
            micro_batches=grad_shards,
            exact=grad_shards is not None,
        )
        self.seed = seed
        self.on_step = on_step
        self._checkpoint_store_factory = checkpoint_store_factory
        self.job: Job | None = None

    @property
    def config(self) -> RuntimeConfig:
        return (
            self.job.config if self.job is not None else (self._config or RuntimeConfig.from_env())
        )

    def fit(self) -> FitResult:
        job = Job(
            self._config,
            seed=self.seed,
            checkpoint_store_factory=self._checkpoint_store_factory,
            on_step=self.on_step,
        )
        self.job = job
        try:
            opt = job.optimizer(self.optimizer, self.model)
            loader = job.loader(self.dataset, **self._loader_options)
            model, loss_fn = self.model, self.loss_fn
            for batch in loader:
                opt.zero_grad()
                for micro in batch if self.grad_shards else (batch,):
                    loss = loss_fn(model, micro)
                    loss.backward()
                    job.report_loss(loss.detach())
                opt.step()
            return FitResult(job.outcome or "stopped", job.step, job._gen, job.loss, job.final)
        finally:
            job.close()
