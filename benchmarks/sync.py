"""Peer state sync against a plain gloo broadcast of the same bytes, side by side.

    python benchmarks/sync.py [--params 26e6] [--trials 3] [--out bench-out/sync]

Two processes form a WorkerGroup (as a World of two does); rank 0 holds a
trained MLP with AdamW (parameters + exp_avg + exp_avg_sq: ~12 bytes a
parameter), rank 1 the same model untrained and an empty optimizer. Each trial
times, in the same processes:

- ``joiner``: ``JobState.sync`` into an empty optimizer (it allocates);
- ``sync``: ``JobState.sync`` into a survivor one step behind (its own state
  tensors receive in place): the critical-path case the goal is about;
- ``pickled``: what the sync did before: the optimizer state ``torch.save``d
  into bytes, broadcast, loaded;
- ``broadcast``: one ``dist.broadcast`` of a float32 tensor of the bytes the
  sync moved (the wire's speed through gloo).

It checks that rank 1's state is bitwise rank 0's after each sync, and writes
results.json and results.md: medians, MB/s, and sync / broadcast throughput.
Goal (the state-transfer issue): sync >= 0.8 x the broadcast.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(params: float) -> Any:
    import torch

    width = 2048
    depth = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(depth)))


def _digest(model: Any, opt: Any) -> str:
    import torch

    h = hashlib.sha256()
    tensors = list(model.state_dict().values())
    tensors += [t for st in opt.state.values() for t in st.values()]
    for t in tensors:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _member(rank: int, addr: str | None, queue: Any, params: float, trials: int) -> None:
    sys.path.insert(0, REPO)
    import torch

    from elastic.coord.world import World, WorldMember
    from elastic.train.group import StoreHost, WorkerGroup
    from elastic.train.state import JobState

    torch.set_num_threads(1)
    host = StoreHost(timeout=60)
    if rank == 0:
        queue.put(host.address)
        addr = host.address
    world = World("bench", 1, (WorldMember("a", store=addr), WorldMember("b", store=addr)))
    group = WorkerGroup(world, rank, host, timeout=300).form()
    model = _model(params)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if rank == 0:
        model(torch.randn(8, 2048)).pow(2).mean().backward()
        opt.step()
    out: dict[str, list[float]] = {"joiner": [], "sync": [], "pickled": [], "broadcast": []}
    moved = 0

    def timed_sync(kind: str) -> int:
        state = JobState().register(model=model, optimizer=opt)
        if rank == 0:
            state.step, state.has_state = 1, True
        group.all_reduce(torch.zeros(1))  # start together
        t0 = time.perf_counter()
        state.sync(group)
        out[kind].append(time.perf_counter() - t0)
        mine = _digest(model, opt).encode()
        theirs = group.broadcast_bytes(mine if rank == 0 else None, 0)
        if theirs != mine:
            raise SystemExit(f"rank {rank}: state after sync differs from rank 0's")
        return state.last_sync[0]

    for _ in range(trials):
        if rank != 0:
            opt.state.clear()  # an empty optimizer, as a joiner has
        timed_sync("joiner")
        if rank == 0:  # one step ahead of its peer, as a survivor behind after a failure
            model(torch.randn(8, 2048)).pow(2).mean().backward()
            opt.step()
        moved = timed_sync("sync")

        if rank != 0:
            opt.state.clear()
        group.all_reduce(torch.zeros(1))
        t0 = time.perf_counter()
        payload = None
        if rank == 0:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            payload = buf.getvalue()
        data = group.broadcast_bytes(payload, 0)
        if rank != 0:
            opt.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
        out["pickled"].append(time.perf_counter() - t0)

        flat = torch.zeros(moved // 4, dtype=torch.float32)
        group.all_reduce(torch.zeros(1))
        t0 = time.perf_counter()
        group.broadcast(flat, 0)
        out["broadcast"].append(time.perf_counter() - t0)
    if rank == 1:
        n = sum(p.numel() for p in model.parameters())
        queue.put({"params": n, "bytes": moved, "times": out})
    group.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=26e6, help="model parameters (about)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default=os.path.join("bench-out", "sync"))
    args = ap.parse_args()
    if args.params < 1e4 or args.trials < 1:
        ap.error("--params must be >= 1e4 and --trials >= 1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(0, None, queue, args.params, args.trials))]
    procs[0].start()
    try:
        addr = queue.get(timeout=120)
        procs.append(ctx.Process(target=_member, args=(1, addr, queue, args.params, args.trials)))
        procs[1].start()
        result = queue.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    mb = result["bytes"] / 1e6
    rows = [
        ("JobState.sync, a survivor one step behind (critical path)", med["sync"]),
        ("JobState.sync, a joiner (allocates its optimizer state)", med["joiner"]),
        ("plain gloo broadcast, same bytes", med["broadcast"]),
    ]
    ratio = med["broadcast"] / med["sync"]
    lines = [
        f"2 processes, gloo, {result['params']:,} parameters with AdamW, {mb:.0f} MB moved "
        f"by the sync; median of {args.trials}.",
        "",
        "| transfer | seconds | MB/s |",
        "|---|---|---|",
        *(f"| {name} | {s:.3f} | {mb / s:.0f} |" for name, s in rows),
        f"| before: optimizer state torch.save + bytes (optimizer only) | {med['pickled']:.3f} "
        "| - |",
        "",
        f"sync (survivor) / broadcast throughput: **{ratio:.2f}** (goal >= 0.8). "
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}.",
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "median_s": med, "ratio": ratio}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
