"""This rank's share of each global batch, through torch's DataLoader.

The order of the data is the :class:`ElasticSampler`'s (independent of the
World); each step's global batch is split over the ranks of the current World.
A DataLoader (worker processes, prefetch, ``pin_memory``) is built per World:
its batch sampler walks a copy of the sampler from the last committed step.
When the World ends (a failure, a join, a leave) its iterator is dropped with
whatever it prefetched, and the next World's starts again from the committed
cursor: a batch prefetched for a step that never committed is never trained on
and none is skipped, so exactly-once holds whatever was in flight.

``micro_batches=K`` cuts each global batch into K fixed micro-batches (the
cut does not depend on the World; rank r takes a contiguous run of them):
gradient accumulation, one all-reduce per step. Each item of the loader is
then an iterable of this rank's micro-batches. ``exact=True`` sums the
micro-batches' gradients in float64, so the update is bitwise the same for
any number of workers (up to K).

A :class:`~elastic.train.records.ShardedRecords` (a stream of shards read in
order) gets a :class:`~elastic.train.records.RecordCursor`: the same split of
the next ``global_batch_size`` positions, never shuffled, with the cursor
checkpointed as ``(shard, offset)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from ..base.errors import ConfigError
from .records import RecordCursor, ShardedRecords
from .sampler import ElasticSampler


@dataclass(frozen=True)
class Part:
    """One batch a rank computes: its sample ids and its weight in the global batch."""

    ids: list[int]
    weight: float  # len(ids) / B; 0 for a stand-in (a rank with no share)


def plan(
    sampler: ElasticSampler,
    rank: int,
    size: int,
    micro: int | None,
    holders: list[int] | None = None,
) -> list[Part]:
    """The batches rank ``rank`` of ``size`` computes at the sampler's current step.

    ``holders``: the ranks that compute the step: those of a live join's
    first step (livesync.py), or the workers beside servers (--servers,
    which hold optimizer state and compute nothing); any other rank computes
    nothing (one sample of weight 0 without
    micro-batches, so that it runs the script's loop body alike)."""
    if holders is not None:
        if rank not in holders:
            return [] if micro else [Part(sampler.global_batch()[:1], 0.0)]
        rank, size = holders.index(rank), len(holders)
    if micro:
        parts, b = sampler.micro_shards(rank, size, micro)
        return [Part(ids, len(ids) / b) for ids in parts]
    share, b = sampler.share(rank, size)
    if not share:
        # More ranks than samples in this (last) batch: compute one sample of
        # it with weight 0, so every rank runs the script's loop body alike.
        return [Part(sampler.global_batch()[:1], 0.0)]
    return [Part(share, len(share) / b)]


class _Batches:
    """Batch sampler of one World: the index lists of every future step, in order."""

    def __init__(
        self,
        sampler: ElasticSampler,
        rank: int,
        size: int,
        micro: int | None,
        merge: bool,
        holders: list[int] | None = None,
        compute: list[int] | None = None,
    ) -> None:
        self.sampler = copy.deepcopy(sampler)
        self.compute = compute  # every step: the ranks that compute (None: all)
        self.rank, self.size, self.micro, self.merge = rank, size, micro, merge
        self.holders = holders  # of its first step only (a live join's)

    def __iter__(self) -> Iterator[list[int]]:
        holders = self.holders if self.holders is not None else self.compute
        while True:
            parts = plan(self.sampler, self.rank, self.size, self.micro, holders)
            holders = self.compute
            if self.merge:
                # One fetch for the step's micro-batches: a DataLoader worker
                # hands each batch over through shared memory, per tensor.
                if parts:
                    yield [i for part in parts for i in part.ids]
            else:
                for part in parts:
                    yield part.ids
            self.sampler.advance()


class _TensorRows:
    """A TensorDataset fetched a whole batch at a time (torch's __getitems__)."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitems__(self, ids: list[int]) -> list[torch.Tensor]:
        index = torch.tensor(ids)
        return [t[index] for t in self.tensors]


def _already_batched(batch: Any) -> Any:
    return batch


def make_sampler(
    dataset: Any,
    size: int,
    global_batch_size: int,
    *,
    seed: int,
    shuffle: bool | None,
    drop_last: bool,
) -> ElasticSampler:
    """The data cursor for ``dataset``: shard order for a ShardedRecords, else a permutation."""
    if isinstance(dataset, ShardedRecords):
        if shuffle:
            raise ConfigError(
                "shuffle=True with elastic.ShardedRecords: its records are read in shard "
                "order (a stream); shuffle the shard list or the records beforehand"
            )
        return RecordCursor(dataset, global_batch_size, seed=seed, drop_last=drop_last)
    return ElasticSampler(
        size,
        global_batch_size,
        seed=seed,
        shuffle=True if shuffle is None else shuffle,
        drop_last=drop_last,
    )


class ElasticLoader:
    """Iterate it for this rank's share of each step; it ends when training ends."""

    def __init__(
        self,
        job: Any,  # the Job (job.py imports this module)
        dataset: Any,
        *,
        global_batch_size: int,
        epochs: int = 1,
        max_steps: int | None = None,
        shuffle: bool | None = None,  # None: True, but False for a ShardedRecords
        drop_last: bool = False,
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        micro_batches: int | None = None,
        exact: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
        if micro_batches is not None and not 1 <= micro_batches <= global_batch_size:
            raise ConfigError(
                f"micro_batches must be between 1 and global_batch_size ({global_batch_size}), "
                f"got {micro_batches}"
            )
        if exact and micro_batches is None:
            raise ConfigError("exact=True needs micro_batches (the fixed cut it sums exactly)")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if batch_size is not None:
            # DataLoader users pass a per-rank batch_size; here the global batch
            # is fixed and a rank's share follows from the World.
            raise ConfigError(
                f"batch_size={batch_size} is a per-rank size, which changes with the World: "
                f"pass global_batch_size (the share of each rank is global_batch_size / "
                f"world size, set by the job)"
            )
        try:
            size = len(dataset)
        except TypeError as exc:
            raise ConfigError(
                f"the dataset ({type(dataset).__name__}) has no len(): job.loader() takes a "
                "map-style dataset (for a stream of shards read in order: elastic.ShardedRecords)"
            ) from exc
        self.job = job
        self.sampler = make_sampler(
            dataset, size, global_batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last
        )
        self.total_steps = epochs * self.sampler.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self.micro = micro_batches
        self.exact = exact
        # A TensorDataset's batch is a list of tensors batched on dim 0: the
        # step's micro-batches are fetched as one and cut here (a collate_fn of
        # the script's may pad per batch, so its batches are fetched one by one).
        self._merge = False
        if isinstance(dataset, TensorDataset) and collate_fn is default_collate:
            self._dataset, self._collate = _TensorRows(dataset), _already_batched
            self._merge = micro_batches is not None
        else:
            self._dataset, self._collate = dataset, collate_fn
        self._loader_args: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
        if num_workers > 0:
            self._loader_args["prefetch_factor"] = prefetch_factor or 2
        self._iter: Iterator[Any] | None = None
        self._iter_key: tuple[int, int] | None = None
        self._mid_step = False
        job.attach_loader(self)

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    def __len__(self) -> int:
        return self.total_steps

    def __iter__(self) -> Iterator[Any]:
        while True:
            parts = self.job.begin_step()
            if parts is None:
                self.drop()
                return
            # A rank with no micro-batch this step (a server, a live joiner)
            # reads nothing: a DataLoader over steps that all plan nothing for
            # it would spin in its batch sampler without ever yielding.
            it = self._data_iter() if parts else iter(())
            if self.micro is None:
                self.job.set_part(0)
                yield self._to_device(next(it))
            else:
                yield self._micro_batches(it, parts)

    def _micro_batches(self, it: Iterator[Any], parts: list[Part]) -> Iterator[Any]:
        # Until every micro-batch of the step is taken, the DataLoader's stream
        # is mid-step: a loop body that breaks out early gets a fresh iterator.
        self._mid_step = bool(parts)
        pieces: list[list[torch.Tensor]] = []
        for i in range(len(parts)):
            if i:
                self.job.fold_micro_batch()  # the previous one's gradient, before the next
            self.job.set_part(i)
            if not self._merge:
                yield self._to_device(next(it))
                continue
            if not i:
                sizes = [len(part.ids) for part in parts]
                pieces = [list(t.split(sizes)) for t in self._to_device(next(it))]
            yield [field[i] for field in pieces]
        self._mid_step = False

    def _data_iter(self) -> Iterator[Any]:
        """The DataLoader iterator of this World, made at its first step."""
        group = self.job.group
        key = (group.generation, self.job.registry.step)
        if (
            self._mid_step
            or self._iter is None
            or self._iter_key is None
            or self._iter_key[0] != key[0]
        ):
            self.drop()
            loader = DataLoader(
                self._dataset,
                batch_sampler=_Batches(
                    self.sampler,
                    group.rank,
                    group.size,
                    self.micro,
                    self._merge,
                    self.job.catchup_holders(),
                    self.job.compute_ranks(),
                ),
                collate_fn=self._collate,
                **self._loader_args,
            )
            self._iter = iter(loader)
        self._iter_key = key
        return self._iter

    def drop(self) -> None:
        """Discard this World's iterator and what it prefetched (workers stop)."""
        it, self._iter, self._iter_key = self._iter, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _to_device(self, batch: Any) -> Any:
        return to_device(batch, self.job.device)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
