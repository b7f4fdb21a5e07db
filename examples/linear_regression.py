"""The classic distributed linear regression, made elastic.

elastic run -n 3 examples/linear_regression.py
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, finish, slow_down  # noqa: E402

from elastic import Trainer  # noqa: E402


def make_dataset(n: int = 2048, dim: int = 8, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 1, generator=g)
    x = torch.randn(n, dim, generator=g)
    y = x @ w + 0.5 + 0.01 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main() -> int:
    args = base_parser(__doc__, steps=100, batch=32, lr=0.05).parse_args()
    torch.manual_seed(args.seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)

    def loss_fn(model, batch):
        slow_down(args.step_time)
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    trainer = Trainer(
        model,
        opt,
        make_dataset(),
        loss_fn=loss_fn,
        global_batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
    )
    return finish(trainer.fit(), model, args.out)


if __name__ == "__main__":
    sys.exit(main())
