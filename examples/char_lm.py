"""A tiny character-level transformer language model on a public-domain text.

elastic run -n 3 examples/char_lm.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base_parser, finish, slow_down  # noqa: E402

from elastic import Trainer  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "coriolanus.txt")


class CharWindows(torch.utils.data.Dataset):
    """Overlapping windows of ``context + 1`` characters (input, next-char target)."""

    def __init__(self, text: str, context: int = 32, stride: int = 4) -> None:
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.context = context
        self.starts = list(range(0, len(self.ids) - context - 1, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = self.starts[i]
        chunk = self.ids[s : s + self.context + 1]
        return chunk[:-1], chunk[1:]


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, context: int, dim: int = 48, heads: int = 2) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(context, dim)
        # dropout=0: the runtime reseeds per step, but a sample's dropout mask
        # would still depend on which rank it lands on.
        layer = torch.nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(h)


def main() -> int:
    args = base_parser(__doc__, steps=60, batch=32, lr=3e-3).parse_args()
    torch.manual_seed(args.seed)
    with open(TEXT, encoding="utf-8") as f:
        data = CharWindows(f.read())
    model = TinyLM(len(data.vocab), data.context)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def loss_fn(model, batch):
        slow_down(args.step_time)
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    # Adam amplifies float32 rounding differences between world sizes; exact
    # micro-batch summation makes the run bitwise independent of them.
    trainer = Trainer(
        model,
        opt,
        data,
        loss_fn=loss_fn,
        global_batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        grad_shards=8,
    )
    return finish(trainer.fit(), model, args.out)


if __name__ == "__main__":
    sys.exit(main())
