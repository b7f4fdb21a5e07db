"""The seed's Horovod linear regression, elastic.

    elastic run -n 3 examples/seed_horovod.py      # or alone: python examples/seed_horovod.py

Against the Horovod version (``hvd.init()``, ``hvd.DistributedOptimizer(...)``,
``for t in range(100)`` over the whole of ``x, y``) three lines differ besides
the imports: ``elastic.init()`` for ``hvd.init()``, ``job.optimizer(...)`` for
``hvd.DistributedOptimizer(...)``, and the loop takes its batches from
``job.loader(...)`` (each step's global batch split over whoever is alive,
every sample once per epoch) instead of ``range(100)``. Plus ``--out``, the
final parameters, written by a worker that trained to the end.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import elastic

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--out", default=None)
p.add_argument("--epochs", type=int, default=100)
args = p.parse_args()

torch.manual_seed(0)
x = torch.randn(512, 10)
y = x @ torch.arange(10.0).unsqueeze(1) + 0.1 * torch.randn(512, 1)

job = elastic.init()
model = torch.nn.Linear(10, 1)
optimizer = job.optimizer(torch.optim.SGD(model.parameters(), lr=0.01), model)
for x_b, y_b in job.loader(TensorDataset(x, y), global_batch_size=64, epochs=args.epochs):
    loss = F.mse_loss(model(x_b), y_b)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

if args.out and job.final:
    tmp = f"{args.out}.{os.getpid()}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, args.out)
