"""Sharded optimizer state with k copies (issue 14): each owner updates its shards only.

``elastic run --shard-state --replicas K``: the wrapped optimizer's state is
cut into shards (placement.py, independent of the World); every shard has K
owners, and each rank holds the state of the shards it owns only (K/W of the
replicated memory). Parameters stay whole on every rank (ZeRO stage 1).

The step (job.py drives it):

1. The gradient all-reduce, as in the replicated mode: every rank ends with
   the whole averaged gradient. (gloo has no reduce-scatter; a reduce-scatter
   would also leave a shard's copies without the gradient of the others'
   shards, which the roll-forward below needs.)
2. The commit point: a small header (kind "apply") after the script's own
   gradient transforms (clipping, unscaling). A rank that completes it knows
   every rank holds the final averaged gradient.
3. Each owner runs the optimizer on views of its shards' slices of the
   parameters (a shadow optimizer over those views, with the wrapped one's
   hyperparameters: valid for an elementwise update, which is why only such
   optimizers are accepted).
4. The parameter exchange: one SUM all-reduce of a flat buffer where each
   shard's first owner wrote its new slice and every other rank zeros
   (``x + 0`` is exact), copied back into the parameters.

Failures. Before the commit header completes anywhere, nothing was applied
anywhere: the step is redone, as in the replicated mode. Once it completed on
one rank, every rank held the step's gradient, so the step is rolled forward:
at the next World a surviving owner that had not applied it (its commit
header failed) applies it from the gradient it kept, the parameters are
exchanged again among the survivors, and shards whose owners died are copied
from a surviving copy to their new owners. Storage is read only when every
copy of a shard died.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from storage.errors import CorruptCheckpointError
from storage.shards import join_pieces

from ..base.errors import ConfigError, ShardLostError
from .placement import Param, Placement, Shard, partition, place
from .state import _allocate, _broadcast_tensors, _fill, _skeleton

# Optimizers whose update of an element depends on that element's gradient
# and state only: running one on a slice of a parameter gives the same numbers
# as on the whole parameter. (LBFGS, Adafactor-style factored moments, LAMB's
# per-tensor trust ratio would not.)
ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam")
)

DEFAULT_SHARDS = 16
MAX_SHARDS = 62  # a rank's holdings travel as the bits of one int64


def _name(index: int) -> str:
    # The parameter's index in the optimizer's state_dict: name order is that order.
    return f"{index:07d}"


class ShardedState:
    """This rank's shards of one wrapped optimizer, and the steps that move them."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, replicas: int, shards: int) -> None:
        if not isinstance(optimizer, ELEMENTWISE):
            names = ", ".join(c.__name__ for c in ELEMENTWISE)
            raise ConfigError(
                f"--shard-state needs an optimizer whose update is elementwise ({names}); "
                f"{type(optimizer).__name__} is not one of them"
            )
        if replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {replicas}")
        if not 1 <= shards <= MAX_SHARDS:
            raise ConfigError(f"the shard count must be 1..{MAX_SHARDS}, got {shards}")
        self.optimizer = optimizer
        self.replicas = replicas
        self.params: dict[str, torch.nn.Parameter] = {}
        self.group_of: dict[str, int] = {}
        index = 0
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self.params[_name(index)] = p
                self.group_of[_name(index)] = gi
                index += 1
        self.shards: list[Shard] = partition(
            [
                Param(n, str(p.dtype).removeprefix("torch."), p.numel(), p.element_size())
                for n, p in self.params.items()
            ],
            shards,
        )
        # Pieces of a parameter that requires no grad would never be stepped.
        self.placement: Placement = {}
        self.owners: dict[str, int] = {}  # member id -> rank, in the current World
        # shard index -> one state dict per piece (the optimizer's per-parameter
        # state of that slice); the shards this rank holds, valid at `self.step`.
        self.held: dict[int, list[dict[str, Any]]] = {}
        self.step = -1  # the step the held shards are at; -1: none
        self.pending = False  # committed nowhere known: kept the gradient for a roll-forward
        self.stale = False  # applied its shards, the parameter exchange failed
        self.shadow: torch.optim.Optimizer | None = None
        self._kept: dict[tuple[str, int, int], torch.Tensor] | None = None
        self._me = ""  # this rank's member id
        self._views: dict[tuple[str, int, int], torch.nn.Parameter] = {}
        self._flat: dict[torch.dtype, torch.Tensor] = {}
        self._offset: dict[str, int] = {}
        offsets: dict[torch.dtype, int] = {}
        for n, p in sorted(self.params.items()):
            self._offset[n] = offsets.get(p.dtype, 0)
            offsets[p.dtype] = self._offset[n] + p.numel()
        self._sizes = offsets

    # -- what this rank owns ---------------------------------------------------------

    def owned(self, member_id: str) -> list[int]:
        return [i for i, owners in sorted(self.placement.items()) if member_id in owners]

    def primary(self, shard: int) -> str:
        return self.placement[shard][0]

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (the k/W the issue measures)."""
        return sum(
            v.numel() * v.element_size()
            for pieces in self.held.values()
            for st in pieces
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )

    def _view(self, name: str, start: int, stop: int) -> torch.nn.Parameter:
        key = (name, start, stop)
        view = self._views.get(key)
        if view is None:
            p = self.params[name]
            # A Parameter made from a view shares its storage: the shadow
            # optimizer's in-place update lands in the model's parameter.
            view = torch.nn.Parameter(p.detach().view(-1)[start:stop], requires_grad=True)
            self._views[key] = view
        return view

    def _rebuild(self, member_id: str) -> None:
        """The shadow optimizer over this rank's owned pieces, with their state."""
        self._me = member_id
        groups: dict[int, list[torch.nn.Parameter]] = {}
        states: list[tuple[torch.nn.Parameter, dict[str, Any]]] = []
        for i in self.owned(member_id):
            for piece, st in zip(self.shards[i].pieces, self.held[i], strict=True):
                view = self._view(piece.name, piece.start, piece.stop)
                groups.setdefault(self.group_of[piece.name], []).append(view)
                states.append((view, st))
        self._shadow_groups = sorted(groups)
        if not groups:
            self.shadow = None
            return
        param_groups = []
        for gi in self._shadow_groups:
            hyper = {k: v for k, v in self.optimizer.param_groups[gi].items() if k != "params"}
            param_groups.append({"params": groups[gi], **hyper})
        self.shadow = type(self.optimizer)(param_groups)
        for view, st in states:
            self.shadow.state[view] = st  # the same dict: updates land in `held`

    # -- the step ----------------------------------------------------------------------

    def keep_gradient(self) -> None:
        """The commit header failed here: keep this rank's shards' slices of the
        gradient (the script may zero ``.grad`` before the next World forms)."""
        self.pending = True
        self._kept = {}
        for i in self.owned(self._me):
            for piece in self.shards[i].pieces:
                g = self.params[piece.name].grad
                if g is not None:
                    key = (piece.name, piece.start, piece.stop)
                    self._kept[key] = g.detach().reshape(-1)[piece.start : piece.stop].clone()

    def apply(self) -> None:
        """Run the optimizer on this rank's shards with the gradient in
        ``.grad`` (or the one kept by :meth:`keep_gradient`)."""
        self.pending = False
        kept, self._kept = self._kept, None
        if self.shadow is None:
            return
        for shadow_group, gi in zip(self.shadow.param_groups, self._shadow_groups, strict=True):
            for k, v in self.optimizer.param_groups[gi].items():
                if k != "params":
                    shadow_group[k] = v  # a scheduler changed lr on the wrapped one
        for (name, start, stop), view in self._views.items():
            if kept is not None:
                view.grad = kept.get((name, start, stop))
                continue
            g = self.params[name].grad
            view.grad = None if g is None else g.detach().reshape(-1)[start:stop]
        self.shadow.step()
        for view in self._views.values():
            view.grad = None

    def exchange_params(self, group: Any, sources: dict[int, int], watch: Any = None) -> None:
        """Every rank's parameters from each shard's ``sources[shard]`` rank
        (one SUM all-reduce per dtype of buffers zero but for the sources' slices)."""
        with torch.no_grad():
            for dtype, size in sorted(self._sizes.items(), key=lambda kv: str(kv[0])):
                flat = self._flat.get(dtype)
                if flat is None:
                    device = next(iter(self.params.values())).device
                    flat = self._flat[dtype] = torch.empty(size, dtype=dtype, device=device)
                flat.zero_()
                for i, shard in enumerate(self.shards):
                    if sources.get(i) != group.rank or shard.dtype != str(dtype).removeprefix(
                        "torch."
                    ):
                        continue
                    for piece in shard.pieces:
                        at = self._offset[piece.name]
                        flat[at + piece.start : at + piece.stop].copy_(
                            self.params[piece.name].detach().reshape(-1)[piece.start : piece.stop]
                        )
                group.all_reduce(flat, watch=watch)
                for name, p in self.params.items():
                    if p.dtype == dtype:
                        at = self._offset[name]
                        p.detach().view(-1).copy_(flat[at : at + p.numel()])
        self.stale = False

    def step_sources(self, rank_of: dict[str, int]) -> dict[int, int]:
        return {i: rank_of[self.primary(i)] for i in self.placement}

    # -- a new World -------------------------------------------------------------------

    def reform(
        self,
        group: Any,
        members: list[tuple[str, str]],
        my_step: int,
        restore: Any = None,
        owners: list[str] | None = None,
    ) -> dict[str, Any]:
        """Reach the new World's placement; every rank of ``group`` calls it.

        ``members``: (member id, host) by rank; ``owners``: the member ids
        that may own shards (the servers; None: every member). ``my_step``: this rank's
        committed step, -1 without state. ``restore()``, called on every rank
        when some shard lost every copy, loads the newest checkpoint into
        ``held`` (all shards, at the returned step) or raises ShardLostError.
        Returns what happened (for the generation event).
        """
        me = members[group.rank][0]
        # A rank whose commit header failed holds the step's gradient: it applies
        # it if someone committed the step (their step is one more than its).
        steps = group.all_gather_int(my_step)
        target = max(steps)
        rolled = False
        if self.pending and self.step >= 0 and target == my_step + 1:
            self.apply()
            self.step = target
            rolled = True
        self.pending, self._kept = False, None
        if my_step < 0:
            self.held, self.step = {}, -1
        valid = target if self.step == target else None
        mask = 0
        if valid is not None:
            for i in self.held:
                mask |= 1 << i
        masks = group.all_gather_int(mask)
        flags = group.all_gather_int(int(rolled) | (int(self.stale) << 1))
        holders = {
            i: [r for r, m in enumerate(masks) if m >> i & 1] for i in range(len(self.shards))
        }
        fresh = target == 0 and not any(masks)
        lost = [] if fresh else [i for i, rs in holders.items() if not rs]
        if lost:
            # Every rank reads the newest checkpoint: the whole job goes back to it.
            restored = restore(lost) if restore is not None else None
            if restored is None:
                raise ShardLostError(
                    f"shard(s) {lost} of the optimizer state lost every one of their "
                    f"{self.replicas} copies and there is no checkpoint to restore from"
                )
            out = self.reform(group, members, restored, owners=owners)
            out.update(restored=restored, lost=lost)
            return out
        # The parameters: after a roll-forward or a failed exchange the
        # survivors' copies differ; each shard's values from one holder.
        if any(flags):
            self.exchange_params(group, {i: rs[0] for i, rs in holders.items()})
        hosts = {m: h for m, h in members if owners is None or m in owners}
        k = min(self.replicas, len(hosts))
        previous = {i: tuple(members[r][0] for r in rs) for i, rs in holders.items()}
        self.placement = place(self.shards, hosts, k, previous)
        moved = 0
        for i, owners in sorted(self.placement.items()):
            want = [m for m in owners if m not in previous.get(i, ())]
            if fresh:
                if me in owners:
                    self.held[i] = [{} for _ in self.shards[i].pieces]
                continue
            if want:
                moved += self._send_shard(group, i, holders[i][0], me in want)
        for i in list(self.held):
            if me not in self.placement.get(i, ()):
                del self.held[i]  # another owner's now: the memory goes
        self.step = target
        self.owners = {m: r for r, (m, _) in enumerate(members)}
        self._rebuild(me)
        return {
            "moved": moved,
            "rolled": sum(f & 1 for f in flags),
            "k": k,
            # Who owns which shard: operators (and tests) see where each copy lives.
            "placement": {str(i): list(o) for i, o in sorted(self.placement.items())},
        }

    def _send_shard(self, group: Any, i: int, src: int, keep: bool) -> int:
        """Shard ``i``'s state from rank ``src`` to every rank; ``keep`` on the new owners."""
        tensors: list[torch.Tensor] = []
        payload = None
        if group.rank == src:
            buf = io.BytesIO()
            torch.save(_skeleton(self.held[i], tensors), buf)
            payload = buf.getvalue()
        data = group.broadcast_bytes(payload, src)
        if group.rank != src:
            # A peer's payload is loaded without executing code.
            skeleton = torch.load(io.BytesIO(data), weights_only=True)
            device = next(iter(self.params.values())).device
            tensors = _allocate(skeleton["meta"], device)
        moved = _broadcast_tensors(group, tensors, src) + len(data)
        if keep and group.rank != src:
            self.held[i] = _fill(skeleton["tree"], tensors)
        return moved

    # -- the full optimizer state (checkpoints, replicated <-> sharded) ---------------

    def load_full(self, state: dict[Any, dict[str, Any]], step: int) -> None:
        """Hold every shard, sliced from a torch optimizer state (``state_dict()["state"]``)."""
        self.held = {}
        for shard in self.shards:
            pieces = []
            for piece in shard.pieces:
                full = state.get(int(piece.name), state.get(piece.name, {}))
                numel = self.params[piece.name].numel()
                pieces.append(
                    {
                        k: (
                            v.detach().reshape(-1)[piece.start : piece.stop].clone()
                            if isinstance(v, torch.Tensor) and v.numel() == numel and v.dim()
                            else (v.clone() if isinstance(v, torch.Tensor) else v)
                        )
                        for k, v in full.items()
                    }
                )
            self.held[shard.index] = pieces
        self.step = step

    def part(self, member_id: str) -> dict[str, Any]:
        """What this rank writes to a checkpoint: the shards it is first owner of
        (each shard once, not once per copy), keyed by shard and piece."""
        out: dict[str, Any] = {}
        for i in self.owned(member_id):
            if self.primary(i) != member_id:
                continue
            for piece, st in zip(self.shards[i].pieces, self.held[i], strict=True):
                out[f"{piece.name}:{piece.start}:{piece.stop}"] = st
        return out


def assemble(parts: list[dict[str, Any]], params: list[torch.Tensor]) -> dict[int, dict[str, Any]]:
    """A torch optimizer ``state`` from checkpoint parts of shards; ConfigError
    naming what is missing unless the pieces cover every parameter once.
    ``params``: the optimizer's parameters in state_dict order."""
    try:
        return join_pieces(parts, [tuple(p.shape) for p in params])
    except CorruptCheckpointError as exc:
        raise ConfigError(str(exc)) from None
