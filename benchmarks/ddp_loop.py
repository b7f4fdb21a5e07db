"""examples/own_loop.py's loop as a user of plain torch writes it: DDP + DataLoader.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/ddp_loop.py --width 1024 --depth 4 --timing t.jsonl

The peer benchmarks/loop.py measures own_loop.py against: the same model,
data, optimizer (AdamW, lr 3e-3, weight decay 0.01), warmup + cosine
LambdaLR, gradient accumulation (``--micro-batches`` per global batch, as in
own_loop.py, so each rank computes micro_batches / world of them, all but the
last under ``ddp.no_sync()``), bf16 autocast on CPU, clipping at 1.0 and
evaluation every ``--eval-every`` steps (sums all-reduced over the ranks).
torch.distributed is set up from torchrun's environment (gloo on CPU, nccl
with CUDA); the data comes through DistributedSampler + DataLoader with
``batch_size = global batch / world``. ``--timing`` writes what own_loop.py's
does: rank 0's clock after each optimizer step, each rank's peak RSS at the end.

It imports neither this project nor anything own_loop.py needs beyond torch:
its memory is that of a plain DDP job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

FEATURES = 16


def make_data(n: int, seed: int) -> TensorDataset:
    # own_loop.py's generator, copied so this process never imports the project.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
    return TensorDataset(x, y)


def make_model(width: int, depth: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, width), torch.nn.GELU()]
    layers += [
        m for _ in range(depth - 1) for m in (torch.nn.Linear(width, width), torch.nn.GELU())
    ]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 3))


def evaluate(model: torch.nn.Module, val_set: TensorDataset, device: torch.device) -> dict:
    """Loss and accuracy over the validation set, each rank a DistributedSampler share."""
    sampler = DistributedSampler(val_set, shuffle=False, drop_last=False)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for x, y in DataLoader(val_set, batch_size=50, sampler=sampler):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
    model.train()
    dist.all_reduce(sums)
    return {"loss": sums[0].item() / sums[2].item(), "accuracy": sums[1].item() / sums[2].item()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=48, help="global batch size")
    p.add_argument("--micro-batches", type=int, default=6, help="accumulation: per global batch")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--epochs", type=int, default=10, help="passes over the 1440 rows at most")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--width", type=int, default=64, help="hidden units per layer")
    p.add_argument("--depth", type=int, default=1, help="hidden layers")
    p.add_argument("--timing", metavar="PATH", default=None)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world or args.micro_batches % world:
        p.error(
            f"--batch-size {args.batch_size} and --micro-batches {args.micro_batches} "
            f"must be multiples of the world size {world}"
        )
    local_micro = args.micro_batches // world
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)
    model = make_model(args.width, args.depth).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = 10

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    train_set = make_data(1440, seed=1)
    val_set = make_data(300, seed=2)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size // world,
        sampler=sampler,
        num_workers=args.num_workers,
    )

    timing = open(args.timing, "a", buffering=1) if args.timing else None  # noqa: SIM115
    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            micro = list(zip(x.chunk(local_micro), y.chunk(local_micro), strict=True))
            for i, (xm, ym) in enumerate(micro):
                last = i == len(micro) - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = F.cross_entropy(ddp(xm), ym) * (len(ym) / len(y))
                    loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            opt.step()
            step += 1
            if timing and rank == 0:
                timing.write(json.dumps({"step": step, "t": time.perf_counter()}) + "\n")
            sched.step()
            opt.zero_grad()
            if step % args.eval_every == 0:
                evaluate(model, val_set, device)
            if step >= args.steps:
                break
        if step >= args.steps:
            break

    if timing:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timing.write(json.dumps({"rank": rank, "pid": os.getpid(), "max_rss_kib": peak}) + "\n")
        timing.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
