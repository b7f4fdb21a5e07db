"""Exactly-once data order that does not depend on the number of workers.

The order of an epoch is a permutation seeded by ``(seed, epoch)``; a global
cursor counts the samples already trained on. Each step takes the next global
batch of ``global_batch_size`` samples and splits it into contiguous shares,
one per rank of the current World. Because the split happens per step, a change
of World at a step boundary re-splits exactly the unconsumed suffix: no sample
is skipped and none is padded or repeated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base.errors import ConfigError


@dataclass
class ElasticSampler:
    dataset_size: int
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    epoch: int = 0
    cursor: int = 0
    _perm_epoch: int = field(default=-1, init=False, repr=False)
    _perm: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise ConfigError(f"dataset is empty (size {self.dataset_size})")
        if self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.drop_last and self.dataset_size < self.global_batch_size:
            raise ConfigError(
                f"drop_last with global_batch_size {self.global_batch_size} > dataset size "
                f"{self.dataset_size} leaves no batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        n, b = self.dataset_size, self.global_batch_size
        return n // b if self.drop_last else -(-n // b)

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(self.dataset_size, generator=g)
            else:
                self._perm = torch.arange(self.dataset_size)
            self._perm_epoch = self.epoch
        return self._perm

    def global_batch(self) -> list[int]:
        """Sample ids of the current step, across all ranks."""
        end = min(self.cursor + self.global_batch_size, self.dataset_size)
        return self._order()[self.cursor : end].tolist()

    def share(self, rank: int, world_size: int) -> tuple[list[int], int]:
        """This rank's sample ids for the current step, and the step's total size.

        Shares differ by at most one sample; a rank may get none when the World
        is larger than the batch (it then contributes a zero gradient).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        batch = self.global_batch()
        b = len(batch)
        lo, hi = rank * b // world_size, (rank + 1) * b // world_size
        return batch[lo:hi], b

    def micro_shards(self, rank: int, world_size: int, shards: int) -> tuple[list[list[int]], int]:
        """This rank's fixed micro-batches of the current step, and the step's size.

        The global batch is cut into ``shards`` micro-batches independent of
        the World; rank r takes a contiguous run of them. Summing per-micro-batch
        gradients exactly makes the update independent of the world size.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        batch = self.global_batch()
        b = len(batch)
        cuts = [j * b // shards for j in range(shards + 1)]
        lo, hi = rank * shards // world_size, (rank + 1) * shards // world_size
        return [batch[cuts[j] : cuts[j + 1]] for j in range(lo, hi) if cuts[j + 1] > cuts[j]], b

    def advance(self) -> None:
        """Mark the current global batch consumed."""
        self.cursor += len(self.global_batch())
        remaining = self.dataset_size - self.cursor
        if remaining <= 0 or (self.drop_last and remaining < self.global_batch_size):
            self.epoch += 1
            self.cursor = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "dataset_size", "global_batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ConfigError(
                    f"sampler state has {key}={state[key]} but this run uses "
                    f"{getattr(self, key)}: the data order would change"
                )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
