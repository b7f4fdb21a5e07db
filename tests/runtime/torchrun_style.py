"""A plain torchrun-style DDP script: env:// rendezvous, nothing elastic-specific.

With CRASH_ON_FIRST_ATTEMPT set, rank 1 dies on the first attempt, as a
worker crashing mid-run would.
"""

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo")  # reads MASTER_ADDR/PORT, RANK, WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for step in range(10):
        if step == 5 and attempt == 0 and rank == 1 and os.environ.get("CRASH_ON_FIRST_ATTEMPT"):
            os._exit(7)
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    out = os.environ.get("RESULT_DIR")
    if out:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "rank": rank,
                    "world": world,
                    "attempt": attempt,
                    "local_rank": int(os.environ["LOCAL_RANK"]),
                },
                f,
            )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
