"""A script's own training loop, elastic: what real loops carry.

    elastic run -n 3 examples/own_loop.py --out final.pt
    python examples/own_loop.py                       # alone: one worker

AdamW with a warmup + cosine learning-rate schedule, gradient clipping on the
averaged gradient, gradient accumulation (micro-batches, one all-reduce per
step), bf16 autocast on CPU, a validation pass every 20 steps (the same
metrics for any number of workers), and a DataLoader with worker processes.
Everything that must survive a failure is registered with ``job.state``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import elastic


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
    return TensorDataset(x, y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=48, help="global batch size")
    p.add_argument("--micro-batches", type=int, default=6, help="accumulation: per global batch")
    p.add_argument("--exact", action="store_true", help="bitwise the same for any world size")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--step-time", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--metrics", default=None, help="append each step's lr and each eval here")
    p.add_argument("--out", default=None, help="final state_dict (torch.save)")
    args = p.parse_args()

    job = elastic.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = 10

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    opt = job.optimizer(opt, model)
    loader = job.loader(
        make_data(1440, seed=1),
        global_batch_size=args.batch_size,
        max_steps=args.steps,
        epochs=10,
        micro_batches=args.micro_batches,
        exact=args.exact,
        num_workers=args.num_workers,
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
    for step_batches in loader:
        for x, y in step_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            job.report_loss(loss.detach())
        if args.step_time:
            import time

            time.sleep(args.step_time)  # stands in for a bigger model
        job.clip_grad_norm_(1.0)
        lr = opt.param_groups[0]["lr"]
        opt.step()
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
    return job.exit_code


if __name__ == "__main__":
    sys.exit(main())
