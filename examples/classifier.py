"""An MLP classifier on generated data, trained on elastic workers.

elastic run -n 3 examples/classifier.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, finish, slow_down  # noqa: E402

from elastic import Trainer  # noqa: E402


def make_dataset(n: int = 4096, dim: int = 16, classes: int = 4, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2.0
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, labels)


def main() -> int:
    args = base_parser(__doc__, steps=120, batch=64, lr=0.05).parse_args()
    torch.manual_seed(args.seed)
    data = make_dataset()
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 4),
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    def loss_fn(model, batch):
        slow_down(args.step_time)
        x, y = batch
        return F.cross_entropy(model(x), y)

    trainer = Trainer(
        model,
        opt,
        data,
        loss_fn=loss_fn,
        global_batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
    )
    return finish(trainer.fit(), model, args.out)


if __name__ == "__main__":
    sys.exit(main())
