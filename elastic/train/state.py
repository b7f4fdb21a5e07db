"""What is synced between peers and checkpointed: model, optimizer, sampler, step.

RNG is not carried: the runtime reseeds at every step from ``(seed, step,
rank)``, so it is derived from the step and needs no transfer.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from .group import WorkerGroup
from .sampler import ElasticSampler


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: ElasticSampler
    step: int = 0  # completed steps
    has_state: bool = False  # False until initialised, restored or received
    extra: dict[str, Any] = field(default_factory=dict)

    def checkpoint_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "extra": self.extra,
        }

    def load_checkpoint_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_rest(state)

    def _load_rest(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.extra = dict(state.get("extra") or {})
        self.has_state = True

    def sync(self, group: WorkerGroup) -> int | None:
        """Bring every rank to the newest state any rank holds.

        Returns the source rank, or None when every rank already held the same
        step (survivors of a failure: nothing to send). Ranks without state
        report -1; the caller guarantees at least one rank has state.
        """
        steps = group.all_gather_int(self.step if self.has_state else -1)
        best = max(steps)
        if best < 0:
            raise RuntimeError("state sync with no state on any rank")
        if all(s == best for s in steps):
            return None
        src = steps.index(best)
        self._broadcast_model(group, src)
        payload = None
        if group.rank == src:
            buf = io.BytesIO()
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "sampler": self.sampler.state_dict(),
                    "step": self.step,
                    "extra": self.extra,
                },
                buf,
            )
            payload = buf.getvalue()
        data = group.broadcast_bytes(payload, src)
        if group.rank != src:
            device = next(self.model.parameters()).device
            # Peers are trusted processes of our own job, but a received
            # payload is still loaded without executing code.
            rest = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
            self.optimizer.load_state_dict(rest["optimizer"])
            self._load_rest(rest)
        return src

    def _broadcast_model(self, group: WorkerGroup, src: int) -> None:
        # One collective per (device, dtype) bucket instead of one per tensor.
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for t in self.model.state_dict().values():
            buckets[(t.device, t.dtype)].append(t)
        with torch.no_grad():
            for tensors in buckets.values():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                group.broadcast(flat, src)
                if group.rank != src:
                    offset = 0
                    for t in tensors:
                        n = t.numel()
                        t.copy_(flat[offset : offset + n].view_as(t))
                        offset += n
