"""A script's own training loop, elastic: what real loops carry.

    elastic run -n 3 examples/own_loop.py --out final.pt
    python examples/own_loop.py                       # alone: one worker
    elastic run -n 3 examples/own_loop.py --sharded-records shards/ --out final.pt
    elastic run -n 2 examples/own_loop.py --width 1024 --depth 4 --timing t.jsonl

AdamW with a warmup + cosine learning-rate schedule, gradient clipping on the
averaged gradient, gradient accumulation (micro-batches, one all-reduce per
step), bf16 autocast on CPU, a validation pass every 20 steps (the same
metrics for any number of workers), and a DataLoader with worker processes.
Everything that must survive a failure is registered with ``job.state``.

``--sharded-records DIR`` reads the training set as a stream of shards
(``elastic.ShardedRecords``), as LLM pretraining reads token shards: the
script writes it to 7 shard files of uneven length, raw little-endian float32
rows (16 features, then the label), loaded without executing code. A stream is
read in order, so it is shuffled beforehand: the shards hold the rows in the
order the map-style run visits them (its sampler's epochs, walked once here),
and with ``--exact`` the result is bitwise that of the run without the option
(when ``--batch-size`` divides the 1440 rows, as the default 48 does).

``--width`` and ``--depth`` size the MLP (the defaults are the small model the
loop tests compare bitwise); ``--timing PATH`` appends rank 0's clock after
every optimizer step and, at the end, each rank's peak RSS, as JSON lines
(benchmarks/loop.py compares them with the same loop under plain DDP,
benchmarks/ddp_loop.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from array import array
from collections.abc import Iterator
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import elastic


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
    return TensorDataset(x, y)


FEATURES = 16
ROW_BYTES = (FEATURES + 1) * 4  # float32 features, then the label as a float32
SHARD_WEIGHTS = (3, 7, 2, 9, 5, 1, 6)  # uneven shard lengths: steps cross shard ends


def _le_bytes(rows: torch.Tensor) -> bytes:
    a = array("f", rows.reshape(-1).tolist())
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _rows(buf: bytes) -> torch.Tensor:
    a = array("f")
    a.frombytes(buf)
    if sys.byteorder == "big":
        a.byteswap()
    return torch.tensor(a, dtype=torch.float32).reshape(-1, FEATURES + 1)


def write_shards(directory: str, data: TensorDataset, order: list[int]) -> list[str]:
    """``data``'s rows in ``order`` as shard files; the same bytes from every rank."""
    x, y = data.tensors
    index = torch.tensor(order)
    rows = torch.cat([x[index], y[index].to(torch.float32)[:, None]], dim=1)
    os.makedirs(directory, exist_ok=True)
    total, n = sum(SHARD_WEIGHTS), len(order)
    cuts = [0]
    for w in SHARD_WEIGHTS:
        cuts.append(cuts[-1] + w)
    urls = []
    for i in range(len(SHARD_WEIGHTS)):
        path = os.path.join(directory, f"shard-{i:05d}-of-{len(SHARD_WEIGHTS):05d}.f32")
        # Every rank writes identical bytes and replaces atomically: no rank
        # waits for another, and a reader never sees a partial file.
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(_le_bytes(rows[cuts[i] * n // total : cuts[i + 1] * n // total]))
        os.replace(tmp, path)
        urls.append(path)
    return urls


def read_shard(url: str, start: int) -> Iterator[torch.Tensor]:
    """The rows of one shard from row ``start`` on (fixed-size rows: a seek)."""
    with fsspec.open(url, "rb") as f:
        f.seek(start * ROW_BYTES)
        while buf := f.read(64 * ROW_BYTES):
            yield from _rows(buf)


def count_rows(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.size(path) // ROW_BYTES


def collate_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # The same tensors the TensorDataset path hands out: float32 x, int64 y.
    t = torch.stack(rows)
    return t[:, :FEATURES].contiguous(), t[:, FEATURES].long()


def sharded_stream(
    directory: str, data: TensorDataset, batch_size: int, steps: int, seed: int
) -> elastic.ShardedRecords:
    """The rows the map-style run trains on, in its order, as a sharded stream."""
    sampler = elastic.ElasticSampler(len(data), batch_size, seed=seed)
    order: list[int] = []
    for _ in range(steps):
        order += sampler.global_batch()
        sampler.advance()
    urls = write_shards(directory, data, order)
    return elastic.ShardedRecords(urls, read_shard, count=count_rows)


def make_model(width: int, depth: int) -> torch.nn.Sequential:
    """``depth`` hidden layers of ``width`` units; (64, 1) is the tests' model,
    its modules built in the same order (the same draws from the seeded RNG)."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, width), torch.nn.GELU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 3))


def peak_rss_line(rank: int) -> str:
    """This process's peak resident set (KiB on Linux), as a --timing line."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return json.dumps({"rank": rank, "pid": os.getpid(), "max_rss_kib": peak}) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=48, help="global batch size")
    p.add_argument("--micro-batches", type=int, default=6, help="accumulation: per global batch")
    p.add_argument("--exact", action="store_true", help="bitwise the same for any world size")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--epochs", type=int, default=10, help="passes over the 1440 rows at most")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--metrics", default=None, help="append each step's lr and each eval here")
    p.add_argument("--out", default=None, help="final state_dict (torch.save)")
    p.add_argument("--width", type=int, default=64, help="hidden units per layer")
    p.add_argument("--depth", type=int, default=1, help="hidden layers")
    p.add_argument(
        "--timing",
        metavar="PATH",
        default=None,
        help="append rank 0's clock after each optimizer step and every rank's peak RSS",
    )
    p.add_argument(
        "--sharded-records",
        metavar="DIR",
        default=None,
        help="write the training set as shard files in DIR and read it as a stream",
    )
    args = p.parse_args()
    if args.width < 1 or args.depth < 1:
        p.error(f"--width and --depth must be >= 1, got {args.width} and {args.depth}")

    job = elastic.init()
    torch.manual_seed(0)
    model = make_model(args.width, args.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = 10

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    opt = job.optimizer(opt, model)
    epochs = args.epochs
    train_set: Any = make_data(1440, seed=1)
    options: dict[str, Any] = {}
    if args.sharded_records:
        steps = min(args.steps, epochs * -(-len(train_set) // args.batch_size))
        train_set = sharded_stream(
            args.sharded_records, train_set, args.batch_size, steps, job.seed
        )
        epochs = 1  # the stream holds every epoch the map-style run trains on
        options["collate_fn"] = collate_rows
    loader = job.loader(
        train_set,
        global_batch_size=args.batch_size,
        max_steps=args.steps,
        epochs=epochs,
        micro_batches=args.micro_batches,
        exact=args.exact,
        num_workers=args.num_workers,
        **options,
    )
    val_set = make_data(300, seed=2)
    state = job.state(model=model, optimizer=opt, scheduler=sched, best_accuracy=0.0)

    def metric_fn(model, batch):
        x, y = batch
        logits = model(x)
        return {
            "loss": F.cross_entropy(logits, y, reduction="sum"),
            "accuracy": (logits.argmax(1) == y).sum(),
        }

    log = open(args.metrics, "a") if args.metrics else None  # noqa: SIM115
    timing = open(args.timing, "a", buffering=1) if args.timing else None  # noqa: SIM115
    rank = job.rank
    for step_batches in loader:
        for x, y in step_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            job.report_loss(loss.detach())
        if args.step_time:
            time.sleep(args.step_time)  # stands in for a bigger model
        job.clip_grad_norm_(1.0)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        rank = job.rank
        if timing and rank == 0:
            timing.write(json.dumps({"step": job.step, "t": time.perf_counter()}) + "\n")
        sched.step()
        opt.zero_grad()
        if log and job.rank == 0 and job.every(1):
            log.write(json.dumps({"step": job.step, "lr": lr}) + "\n")
        if job.every(args.eval_every):
            metrics = job.evaluate(model, val_set, metric_fn, batch_size=50)
            state.best_accuracy = max(state.best_accuracy, metrics["accuracy"])
            if log and job.rank == 0:
                log.write(json.dumps({"step": job.step, "eval": metrics}) + "\n")
        if log:
            log.flush()

    if args.out and job.final:
        tmp = f"{args.out}.{os.getpid()}.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "best_accuracy": state.best_accuracy,
                "lr": sched.get_last_lr(),
            },
            tmp,
        )
        os.replace(tmp, args.out)
    if timing:
        timing.write(peak_rss_line(rank))
        timing.close()
    return job.exit_code


if __name__ == "__main__":
    sys.exit(main())
