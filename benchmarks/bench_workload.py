"""The model both sides of benchmarks/recovery.py train, in two harnesses.

    python bench_workload.py elastic ...   # under `elastic run`: the Trainer
    python bench_workload.py ddp ...       # under torchrun: plain DDP, checkpoint
                                           # every --ckpt-every steps and resume
                                           # from it, as torchrun's docs advise

Both use the same MLP, data, global batch and per-step sleep (standing in for
a bigger model's compute), and write one JSON line per completed step (rank 0)
to $BENCH_EVENTS for the elastic side's event log format.

``--hangable``: SIGUSR1 hangs the main (training) thread in a handler that never
returns while the process's other threads go on (benchmarks/failures.py's
"hang" fault). ``--out-dir`` (elastic): a worker that trained to the last step
writes its parameters to ``<member id>.pt`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def make_data(n: int = 16384, dim: int = 64, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(99)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, dim, generator=g), y)


def make_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


_never = threading.Event()


def _hang(_signum: int, _frame: object) -> None:
    _never.wait()  # no timeout: this is the hang under test; the benchmark kills the process


def write_final(model: torch.nn.Module, out_dir: str) -> None:
    from elastic import RuntimeConfig

    # Under torchrun there is no elastic config: the pid names the file.
    member = (
        RuntimeConfig.from_env().member_id if "ELASTIC_CONFIG" in os.environ else str(os.getpid())
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{member}.pt")
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def run_elastic(args: argparse.Namespace) -> int:
    from elastic import Trainer

    model = make_model(args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss_fn(model, batch):
        if args.step_time:
            time.sleep(args.step_time)
        x, y = batch
        return F.cross_entropy(model(x), y)

    result = Trainer(
        model,
        opt,
        make_data(),
        loss_fn=loss_fn,
        global_batch_size=args.batch,
        max_steps=args.steps,
        epochs=1000,
    ).fit()
    # Only a worker that trained to the end holds the job's final parameters.
    if args.out_dir and result.final:
        write_final(model, args.out_dir)
    return result.exit_code


def run_ddp(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    model = torch.nn.parallel.DistributedDataParallel(make_model(args.hidden))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = make_data()
    start = 0
    ckpt = args.ckpt
    if ckpt and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    events = open(os.environ["BENCH_EVENTS"], "a") if rank == 0 else None
    if events:
        events.write(
            json.dumps({"event": "start", "t": time.time(), "attempt": attempt, "step": start})
            + "\n"
        )
        events.flush()
    n = len(data)
    for step in range(start, args.steps):
        lo = (step * args.batch) % n
        idx = list(range(lo + rank * args.batch // world, lo + (rank + 1) * args.batch // world))
        x, y = data[[i % n for i in idx]]
        if args.step_time:
            time.sleep(args.step_time)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        done = step + 1
        if events:
            events.write(
                json.dumps(
                    {
                        "event": "step",
                        "t": time.time(),
                        "step": done,
                        "attempt": attempt,
                        "world": world,
                    }
                )
                + "\n"
            )
            events.flush()
        if ckpt and rank == 0 and done % args.ckpt_every == 0:
            tmp = ckpt + ".tmp"
            torch.save(
                {"model": model.module.state_dict(), "opt": opt.state_dict(), "step": done}, tmp
            )
            os.replace(tmp, ckpt)
    dist.destroy_process_group()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["elastic", "ddp"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--step-time", type=float, default=0.0)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument(
        "--hangable", action="store_true", help="SIGUSR1 hangs the training thread forever"
    )
    p.add_argument("--out-dir", default=None, help="elastic: final parameters go here")
    args = p.parse_args()
    if args.hangable:
        signal.signal(signal.SIGUSR1, _hang)
    return run_elastic(args) if args.mode == "elastic" else run_ddp(args)


if __name__ == "__main__":
    sys.exit(main())
