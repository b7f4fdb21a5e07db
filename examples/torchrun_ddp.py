"""A plain torchrun script (env:// rendezvous, DDP, no elastic API).

torchrun --nproc-per-node 2 examples/torchrun_ddp.py
elastic run --torchrun-compat -n 2 examples/torchrun_ddp.py   # the same, unchanged
"""

import os

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK, WORLD_SIZE from the launcher
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1000 + rank)
    w = torch.arange(8, dtype=torch.float32).unsqueeze(1) / 8
    for _ in range(200):
        x = torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        print(f"world {world}, restart {restarts}, final loss {loss.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
