"""Sharded optimizer state: a script's own loop whose AdamW state is cut over the workers.

    elastic run -n 4 --shard-state --replicas 2 examples/sharded.py
    elastic run -n 4 examples/sharded.py                   # replicated, to compare
    python examples/sharded.py --width 64 --depth 2 --steps 5   # alone: one worker

With ``--shard-state --replicas 2`` each rank holds the AdamW moments of the
shards it owns only, each shard on 2 of the 4 workers: about half the
replicated optimizer memory (k/W), while parameters and gradients stay whole on
every rank. The report line each rank writes at the end (``--report PATH``)
shows it: ``optimizer_state_bytes`` (what the rank holds) next to
``replicated_bytes`` (what it would hold replicated: two float32 moments per
parameter and one float32 step per parameter tensor). Kill a worker (SIGKILL)
mid-run and the survivors copy its shards from a surviving copy without
reading the checkpoint; with ``--replicas 1`` a killed owner's shards have no
copy left and the newest checkpoint is restored (``--checkpoint-every N``).
The event log's generation event says which (``"shards": {"moved", "rolled"}``
or a ``restore`` event).

The model is an MLP (``--width`` units, an input layer and ``--depth`` hidden
layers of width x width, 10 classes): the defaults, 2048 and 6 on 256 inputs,
are 25.7 M parameters (the count is printed). The data is synthetic, the same
for every rank from ``--seed``. ``--exact`` sums ``--micro-batches`` in
float64, so the run is bitwise the same for any number of workers and either
mode. ``--out PATH`` saves the final parameters (rank 0); ``--timing PATH``
appends every rank's clock after each step; ``--step-time S`` sleeps S seconds
a step (a bigger model's compute, so a fault can land mid-run in a tiny one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import elastic

FEATURES = 256
CLASSES = 10


def make_model(width: int, depth: int) -> torch.nn.Sequential:
    """An input layer, ``depth`` hidden layers of ``width`` x ``width``, the output layer."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, width), torch.nn.GELU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, CLASSES))


def make_data(rows: int, seed: int) -> TensorDataset:
    """Labels from a fixed random projection of the inputs: learnable, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(1))


def replicated_bytes(model: torch.nn.Module) -> int:
    """AdamW's state held replicated: exp_avg and exp_avg_sq (float32, one
    element per parameter element) and a float32 step per parameter tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(8 * p.numel() + 4 for p in params)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--width", type=int, default=2048, help="hidden units per layer")
    p.add_argument("--depth", type=int, default=6, help="hidden width x width layers")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--rows", type=int, default=4096, help="rows of the synthetic training set")
    p.add_argument("--seed", type=int, default=0, help="data and initial parameters")
    p.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="fixed micro-batches per global batch (default: none; 8 with --exact)",
    )
    p.add_argument("--exact", action="store_true", help="bitwise the same for any world size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--out", default=None, help="final state_dict (torch.save, rank 0)")
    p.add_argument("--report", default=None, help="append each rank's memory line here")
    p.add_argument("--timing", default=None, help="append every rank's clock after each step")
    args = p.parse_args()
    if args.width < 1 or args.depth < 0:
        p.error(f"--width must be >= 1 and --depth >= 0, got {args.width} and {args.depth}")
    if args.steps < 1 or args.batch_size < 1 or args.rows < 1:
        p.error(
            f"--steps, --batch-size and --rows must be >= 1, got {args.steps}, "
            f"{args.batch_size} and {args.rows}"
        )
    micro = args.micro_batches
    if micro is None and args.exact:
        micro = min(8, args.batch_size)

    job = elastic.init()
    torch.manual_seed(args.seed)
    model = make_model(args.width, args.depth)
    params = sum(t.numel() for t in model.parameters())
    if job.rank == 0:
        print(
            f"MLP {FEATURES}-{args.width}x{args.depth + 1}-{CLASSES}: {params:,} parameters, "
            f"AdamW state {replicated_bytes(model) / 2**20:.1f} MiB replicated",
            flush=True,
        )
    opt = job.optimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), model)
    data = make_data(args.rows, args.seed + 1)
    loader = job.loader(
        data,
        global_batch_size=args.batch_size,
        max_steps=args.steps,
        epochs=math.ceil(args.steps * args.batch_size / args.rows),
        micro_batches=micro,
        exact=args.exact,
    )
    job.state(model=model, optimizer=opt)

    timing = open(args.timing, "a", buffering=1) if args.timing else None  # noqa: SIM115
    rank, world = job.rank, job.world_size
    for item in loader:
        for x, y in item if micro else [item]:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            job.report_loss(loss.detach())
        if args.step_time:
            time.sleep(args.step_time)  # stands in for a bigger model
        opt.step()
        opt.zero_grad()
        rank, world = job.rank, job.world_size
        if timing:
            # One write per line (line-buffered, O_APPEND): ranks share the file.
            line = {"rank": rank, "world": world, "step": job.step, "t": time.time()}
            timing.write(json.dumps(line) + "\n")
    if timing:
        timing.close()

    if args.out and job.final and rank == 0:
        tmp = f"{args.out}.{os.getpid()}.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, args.out)
    if args.report:
        line = {
            "rank": rank,
            "world": world,
            "pid": os.getpid(),
            "step": job.step,
            "sharded": job.sharded,
            "params": params,
            "optimizer_state_bytes": job.optimizer_state_bytes(),
            "replicated_bytes": replicated_bytes(model),
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        with open(args.report, "a") as f:
            f.write(json.dumps(line) + "\n")
    return job.exit_code


if __name__ == "__main__":
    sys.exit(main())
