"""A join that does not pause the World: the state goes to the joiner while the
World trains its next step.

When the only ranks behind are joiners (no state at all) and the others hold
the same step ``s``, a new World does not wait for the transfer:

1. What is small goes first, to every rank, as the ordinary sync sends it: the
   skeleton (step, data cursor, plain values, hyperparameters, the tensors'
   shapes) and every tensor under ``DIRECT_BYTES`` plus the modules' buffers
   (a forward may change a buffer, BatchNorm's statistics say; a parameter or
   an optimizer tensor changes only in ``optimizer.step()``).
2. The big tensors (parameters, optimizer moments) are split between the
   holders, balanced by bytes, and each holder sends its part to each joiner
   point to point on a side group, started and left running.
3. Step ``s + 1`` is trained by the holders alone (the global batch split
   between them, ``plan(..., holders=...)``); a joiner takes no micro-batch
   (or, without micro-batches, one sample of weight 0, computed only once
   its state is in), yet it takes part in the gradient all-reduce, with zeros,
   and so receives the step's averaged gradient.
4. Before anyone applies step ``s + 1``'s update, every rank waits for the
   transfers (:meth:`LiveSync.finish`): a holder must not change what it still
   sends; a joiner then loads what it received and applies the same update to
   the same state with the same gradient, so it is bitwise the holders' from
   there on.

The survivors' pause is what the transfer takes beyond their own forward and
backward of step ``s + 1``. A transfer that fails (a joiner or a sender dies,
a peer hangs) fails the step as a collective does: the World re-forms, the
joiner still has no state (``has_state`` turns true only once everything is
in) and is synced again by the next World.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .group import Watch, WorkerGroup
from .state import (
    DIRECT_BYTES,
    JobState,
    _broadcast_tensors,
    _device_of,
    _fill,
    _skeleton,
)


@dataclass
class LiveSync:
    """One live join in progress, as one rank sees it."""

    group: WorkerGroup
    holders: list[int]  # ranks holding the state; they train the first step alone
    joiners: list[int]
    step: int  # the step the holders hold (the joiners receive)
    started: list = field(default_factory=list)  # (work, t0) of this rank's transfers
    moved: int = 0  # bytes this rank sends or receives
    t0: float = 0.0
    load: Any = None  # a joiner's: puts what arrived into its objects
    done: bool = False

    @property
    def joining(self) -> bool:
        return self.group.rank in self.joiners

    def finish(self, watch: Watch | None = None) -> tuple[int, float]:
        """Wait for this rank's transfers; a joiner then holds the state.
        Returns (bytes, seconds since the sync began). WorkerGroupError when a
        transfer failed."""
        if not self.done:
            self.group.wait_p2p(self.started, watch)
            if self.load is not None:
                self.load()
            self.done = True
        return self.moved, time.monotonic() - self.t0


def wants_live(steps: list[int]) -> bool:
    """Whether ``steps`` (every rank's step, -1 without state) call for a live
    join: not when everyone is at one step, nor when a survivor is behind (its
    state must not lag while it trains), nor at a fresh start (nobody trains yet)."""
    best = max(steps)
    joiners = [s for s in steps if s != best]
    return best > 0 and bool(joiners) and all(s == -1 for s in joiners)


def live_sync(state: JobState, group: WorkerGroup, steps: list[int]) -> LiveSync:
    """Start a live join (``wants_live(steps)`` holds)."""
    best = max(steps)
    holders = [r for r, s in enumerate(steps) if s == best]
    joiners = [r for r, s in enumerate(steps) if s != best]
    live = LiveSync(group, holders, joiners, best, t0=time.monotonic())
    src, rank = holders[0], group.rank
    modules = state.modules
    module_tensors = [list(m.state_dict().values()) for m in modules]
    params = {p.data_ptr() for m in modules for p in m.parameters()}
    payload = None
    if rank == src:
        rest = state.sync_tree()
        payload_buf = io.BytesIO()
        torch.save(_skeleton(rest, []), payload_buf)  # its tensors are listed below, alike
        payload = payload_buf.getvalue()
    data = group.broadcast_bytes(payload, src)
    # Peers are trusted processes of our own job, but a received payload is
    # still loaded without executing code.
    skeleton = torch.load(io.BytesIO(data), weights_only=True)
    rest_tensors = state._receive_into(skeleton, _device_of(modules))
    tensors = [t for ts in module_tensors for t in ts]
    n_module = len(tensors)
    tensors += rest_tensors

    def big(i: int, t: torch.Tensor) -> bool:
        # A module's buffer goes now: a forward may change it.
        is_param = i >= n_module or t.data_ptr() in params
        return is_param and t.is_contiguous() and t.numel() * t.element_size() >= DIRECT_BYTES

    late = [i for i, t in enumerate(tensors) if big(i, t)]
    late_set = set(late)
    now = [t for i, t in enumerate(tensors) if i not in late_set]
    live.moved = len(data) + _broadcast_tensors(group, now, src)
    if live.joining:
        state.load_light(skeleton["tree"])  # the step and data cursor: plans the next step
    # Each big tensor from one holder, balanced by bytes (the same split on every rank).
    load = [0] * len(holders)
    owner: dict[int, int] = {}
    for i in sorted(late, key=lambda i: -tensors[i].numel() * tensors[i].element_size()):
        h = load.index(min(load))
        owner[i] = holders[h]
        load[h] += tensors[i].numel() * tensors[i].element_size()
    side = group.side_group()
    with torch.no_grad():
        for i in late:
            t, nbytes = tensors[i], tensors[i].numel() * tensors[i].element_size()
            if rank == owner[i]:
                for j in joiners:
                    live.started.append(group.start_p2p(side, t, j, tag=i, send=True))
                    live.moved += nbytes
            elif live.joining:
                live.started.append(group.start_p2p(side, t, owner[i], tag=i, send=False))
                live.moved += nbytes
    if live.joining:
        tree = skeleton["tree"]

        def load_received() -> None:
            state.load_received(_fill(tree, rest_tensors))

        live.load = load_received
    return live
