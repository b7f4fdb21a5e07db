"""Evaluation over the current World: each validation sample once, the same value for any size.

The validation set is cut into fixed chunks (``batch_size`` samples, the cut
independent of the World); chunk j is evaluated by rank ``j % world_size``.
Every rank sends its chunks' metric sums in a chunks x metrics table where
each entry has exactly one non-zero contributor, so the all-reduce is exact,
and every rank adds the chunks up in chunk order: the result is bitwise the
same for any world size.

A failure during the evaluation (a peer killed, frozen, partitioned) does not
change the answer: the rank evaluates the chunks it lacks itself, returns the
same metrics, and the job re-forms at the next step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..base.errors import ConfigError, WorkerGroupError
from .loader import to_device

MetricFn = Callable[[torch.nn.Module, Any], dict[str, Any]]


def _chunk_ids(j: int, n: int, batch_size: int) -> list[int]:
    return list(range(j * batch_size, min(n, (j + 1) * batch_size)))


def _sums(out: Any) -> dict[str, float]:
    if not isinstance(out, dict) or not out:
        raise ConfigError(
            "metric_fn must return a non-empty dict of sums over the batch, "
            f"got {type(out).__name__}"
        )
    sums = {}
    for name, value in out.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().double().sum().item()
        sums[str(name)] = float(value)
    return sums


def _log(job: Any, n: int, batch_size: int, chunks: list[int], phase: str) -> None:
    """One line of the validation ledger: ``world`` (the chunks this rank
    computed for the World, before the exchange), then ``result`` (the
    exchange succeeded) or ``alone`` (the chunks it then computed itself)."""
    if job.val_ledger is None:
        return
    group = job.group
    job.val_ledger.record(
        step=job.step,
        epoch=0,
        generation=group.generation if group is not None else -1,
        rank=group.rank if group is not None else 0,
        world_size=group.size if group is not None else 1,
        ids=[i for j in sorted(chunks) for i in _chunk_ids(j, n, batch_size)],
        phase=phase,
    )


def run_evaluation(
    job: Any,  # the Job (not imported: job.py imports this module)
    model: torch.nn.Module,
    dataset: Sequence[Any],
    metric_fn: MetricFn,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
) -> dict[str, float]:
    if batch_size < 1:
        raise ConfigError(f"evaluate batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    if n < 1:
        raise ConfigError("evaluate() on an empty dataset")
    chunks = -(-n // batch_size)
    results: dict[int, dict[str, float]] = {}
    computed: list[int] = []

    def compute(j: int) -> None:
        ids = _chunk_ids(j, n, batch_size)
        # Dropout-free in eval mode, but a metric may sample: seeded per chunk.
        torch.default_generator.manual_seed(job.seed * 31 + j)
        batch = to_device(collate_fn([dataset[i] for i in ids]), job.device)
        results[j] = _sums(metric_fn(model, batch))
        computed.append(j)

    group = job.group
    world_chunks = 0
    alone = group is None or job._phase in ("failed", "open")
    rng = torch.get_rng_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not alone:
                try:
                    job._eval_header()
                except WorkerGroupError as exc:
                    job._mark_broken(exc)
                    alone = True
            if not alone:
                for j in range(group.rank, chunks, group.size):
                    compute(j)
                # Logged before the exchange, as the training ledger is: a rank
                # that dies after contributing its chunks has said which.
                _log(job, n, batch_size, computed, "world")
                try:
                    names_raw = group.broadcast_bytes(
                        json.dumps(sorted(results[0])).encode() if group.rank == 0 else None, 0
                    )
                    names = json.loads(names_raw.decode())
                    table = torch.zeros(chunks, len(names), dtype=torch.float64)
                    for j, sums in results.items():
                        if sorted(sums) != names:
                            raise ConfigError(
                                f"metric_fn returned {sorted(sums)} for chunk {j}, {names} for "
                                "chunk 0: it must return the same names for every batch"
                            )
                        table[j] = torch.tensor([sums[k] for k in names], dtype=torch.float64)
                    group.all_reduce(table)
                    for j in range(chunks):
                        if j not in results:
                            results[j] = dict(zip(names, table[j].tolist(), strict=True))
                except WorkerGroupError as exc:
                    job._mark_broken(exc)
                    alone = True
            world_chunks = len(computed)
            if alone:
                for j in range(chunks):
                    if j not in results:
                        compute(j)
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    _log(job, n, batch_size, computed[world_chunks:], "alone" if alone else "result")
    names = sorted(results[0])
    totals = dict.fromkeys(names, 0.0)
    for j in range(chunks):
        for name in names:
            totals[name] += results[j][name]
    return {name: totals[name] / n for name in names}
