"""What survives a failure: every registered object, synced from peers and checkpointed.

A job's state is the step count, the data cursor (the sampler) and whatever
the script registers: modules, optimizers, LR schedulers, GradScalers, any
object with ``state_dict``/``load_state_dict``, and plain values (an epoch, a
best metric). Modules move as tensors (one broadcast per dtype); everything
else as one payload loaded without executing code.

RNG is not carried: the runtime reseeds at every step from ``(seed, step,
rank)``, so it is derived from the step and needs no transfer.

Rollback. A step's update is applied only after its gradient all-reduce
succeeded, so the parameters and the optimizer's tensors of a failed step are
untouched. What the script does after ``optimizer.step()`` in the same loop
body (a scheduler step, a GradScaler update, a counter) is not: the light part
of the state (every entry except the trained modules and the optimizers'
tensors; small) is copied at each step's start and put back when the step
failed.
"""

from __future__ import annotations

import copy
import io
import time
from collections import defaultdict
from typing import Any

import torch

from ..base.errors import ConfigError
from .group import WorkerGroup
from .sampler import ElasticSampler

# Plain values a checkpoint or a peer's payload may carry (loaded with
# torch.load(weights_only=True), which admits these and tensors).
_PLAIN = (int, float, bool, str, type(None))

# Names the runtime keeps for itself in the state dict.
_RESERVED = frozenset({"step", "sampler", "values"})


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


class JobState:
    """The registry of what must survive; attribute access reads and writes plain values.

    ``state.epoch += 1`` works for a registered plain value; objects are held
    by reference (the script keeps using its own model and optimizer).
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_objects", {})
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "step", 0)  # completed (committed) steps
        object.__setattr__(self, "has_state", False)  # initialised, restored or received
        object.__setattr__(self, "sampler", None)
        # ids of modules whose tensors change only through a wrapped optimizer's
        # step (so a failed step leaves them as they were: no copy needed)
        object.__setattr__(self, "_committed_only", set())
        # (bytes, seconds) of the last peer sync that moved state
        object.__setattr__(self, "last_sync", None)

    # -- registration -------------------------------------------------------

    def register(self, **entries: Any) -> JobState:
        for name, obj in entries.items():
            if name in _RESERVED or name.startswith("_"):
                raise ConfigError(f"state entry name {name!r} is reserved")
            if _stateful(obj):
                for other_name, other in self._objects.items():
                    if other is obj and other_name != name:
                        del self._objects[other_name]  # the script's name wins
                        break
                if name in self._values:
                    del self._values[name]
                self._objects[name] = obj
            elif isinstance(obj, _PLAIN):
                self._values[name] = obj
            else:
                raise ConfigError(
                    f"state entry {name!r} is a {type(obj).__name__}: register objects with "
                    "state_dict()/load_state_dict() or plain values (int, float, bool, str, None)"
                )
        return self

    def register_default(self, name: str, obj: Any) -> None:
        """Register ``obj`` under ``name`` unless it is registered already."""
        if any(o is obj for o in self._objects.values()):
            return
        base, n = name, 1
        while name in self._objects or name in self._values:
            n += 1
            name = f"{base}{n}"
        self.register(**{name: obj})

    def name_of(self, obj: Any) -> str | None:
        """The name ``obj`` is registered under, or None."""
        for name, other in self._objects.items():
            if other is obj:
                return name
        return None

    def objects_of(self, kind: type) -> list[Any]:
        """The registered objects that are instances of ``kind``."""
        return [o for o in self._objects.values() if isinstance(o, kind)]

    def mark_committed_only(self, module: torch.nn.Module) -> None:
        self._committed_only.add(id(module))

    def set_sampler(self, sampler: ElasticSampler) -> None:
        object.__setattr__(self, "sampler", sampler)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        objects = object.__getattribute__(self, "_objects")
        if name in objects:
            return objects[name]
        raise AttributeError(f"no state entry {name!r} (register it with job.state({name}=...))")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("step", "has_state"):
            object.__setattr__(self, name, value)
            return
        if name in self._values:
            if not isinstance(value, _PLAIN):
                raise ConfigError(f"state value {name!r} must stay a plain value, got {value!r}")
            self._values[name] = value
            return
        raise AttributeError(
            f"no state value {name!r}: register it first with job.state({name}=...)"
        )

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [o for o in self._objects.values() if isinstance(o, torch.nn.Module)]

    # -- checkpoints ----------------------------------------------------------

    def checkpoint_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: obj.state_dict()
            for name, obj in self._objects.items()
            if isinstance(obj, torch.nn.Module)
        }
        out.update(self.sync_tree())  # the rest as a peer sync sends it
        return out

    def load_checkpoint_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in self._objects if name not in state]
        if missing:
            raise ConfigError(
                f"the checkpoint holds no {', '.join(missing)} (it has "
                f"{', '.join(sorted(k for k in state if k not in _RESERVED))}): "
                "the script registers different state than the run that saved it"
            )
        for name, obj in self._objects.items():
            obj.load_state_dict(state[name])
        self._load_rest(state)

    def _load_rest(self, state: dict[str, Any]) -> None:
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        for name, value in dict(state.get("values") or state.get("extra") or {}).items():
            if name in self._values:
                self._values[name] = value
        self.step = int(state["step"])
        self.has_state = True

    # -- rollback of the light part -------------------------------------------

    def light_snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"values": dict(self._values)}
        for name, obj in self._objects.items():
            if isinstance(obj, torch.nn.Module) and id(obj) in self._committed_only:
                continue
            if isinstance(obj, torch.optim.Optimizer):
                # Its tensors change only in step(); a scheduler changes its
                # hyperparameters (lr) from outside.
                snap[name] = [
                    {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                    for g in obj.param_groups
                ]
            else:
                snap[name] = copy.deepcopy(obj.state_dict())
        return snap

    def restore_light(self, snap: dict[str, Any]) -> None:
        self._values.update(snap["values"])
        for name, obj in self._objects.items():
            if name not in snap:
                continue
            if isinstance(obj, torch.optim.Optimizer):
                for group, saved in zip(obj.param_groups, snap[name], strict=True):
                    group.update(saved)
            else:
                obj.load_state_dict(snap[name])

    # -- peer sync ---------------------------------------------------------------

    def _rest_state(self) -> dict[str, Any]:
        """The state dicts of everything but the modules (their tensors by reference)."""
        return {
            name: obj.state_dict()
            for name, obj in self._objects.items()
            if not isinstance(obj, torch.nn.Module)
        }

    def _receive_into(self, skeleton: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
        """Where a sync's tensors land: this rank's own state tensors when they
        have the sender's shapes (a survivor one step behind: no allocation,
        and loading them back is no copy), else new ones (a joiner)."""
        own: list[torch.Tensor] = []
        mine = _skeleton(self._rest_state(), own)
        if mine["paths"] == skeleton["paths"] and mine["meta"] == [
            tuple(m) for m in skeleton["meta"]
        ]:
            return own
        return _allocate(skeleton["meta"], device)

    def gather_steps(self, group: WorkerGroup) -> list[int]:
        """Every rank's step, -1 for a rank without state."""
        return group.all_gather_int(self.step if self.has_state else -1)

    def sync_tree(self) -> dict[str, Any]:
        """What a peer sync sends: every object's state dict but the modules',
        the step, the plain values and the data cursor (tensors by reference)."""
        rest = self._rest_state()
        rest["step"] = self.step
        rest["values"] = dict(self._values)
        if self.sampler is not None:
            rest["sampler"] = self.sampler.state_dict()
        return rest

    def load_light(self, tree: dict[str, Any]) -> None:
        """A joiner's step, values and data cursor from a live sync's skeleton,
        before its tensors arrive: it can plan the step, it holds no state yet."""
        self._load_rest(tree)
        self.has_state = False

    def load_received(self, rest: dict[str, Any]) -> None:
        """The rest of a live sync, once its tensors are in: the state is whole."""
        for name, obj in self._objects.items():
            if not isinstance(obj, torch.nn.Module):
                obj.load_state_dict(rest[name])
        self.has_state = True

    def sync(self, group: WorkerGroup, steps: list[int] | None = None) -> int | None:
        """Bring every rank to the newest state any rank holds.

        Returns the source rank, or None when every rank already held the same
        step (survivors of a failure: nothing to send). Ranks without state
        report -1; the caller guarantees at least one rank has state.
        """
        if steps is None:
            steps = self.gather_steps(group)
        best = max(steps)
        if best < 0:
            raise RuntimeError("state sync with no state on any rank")
        if all(s == best for s in steps):
            return None
        src = steps.index(best)
        t0 = time.monotonic()
        moved = 0
        modules = self.modules
        for module in modules:
            moved += _broadcast_module(group, module, src)
        # The rest (optimizers, schedulers, scalers, values, the sampler) goes
        # as tensors, big ones as themselves, small ones flattened per (device, dtype); only
        # what is left without its tensors, a small skeleton, is serialized.
        tensors: list[torch.Tensor] = []
        payload = None
        if group.rank == src:
            buf = io.BytesIO()
            torch.save(_skeleton(self.sync_tree(), tensors), buf)
            payload = buf.getvalue()
        data = group.broadcast_bytes(payload, src)
        moved += len(data)
        # Peers are trusted processes of our own job, but a received payload is
        # still loaded without executing code.
        if group.rank != src:
            skeleton = torch.load(io.BytesIO(data), weights_only=True)
            tensors = self._receive_into(skeleton, _device_of(modules))
        moved += _broadcast_tensors(group, tensors, src)
        if group.rank != src:
            rest = _fill(skeleton["tree"], tensors)
            for name, obj in self._objects.items():
                if not isinstance(obj, torch.nn.Module):
                    obj.load_state_dict(rest[name])
            self._load_rest(rest)
        object.__setattr__(self, "last_sync", (moved, time.monotonic() - t0))
        return src


_TENSOR = "\x00elastic-tensor"  # a placeholder key no state_dict uses


def _skeleton(tree: Any, tensors: list[torch.Tensor]) -> dict[str, Any]:
    """``tree`` with each tensor replaced by its index in ``tensors``, and what a
    receiver needs to allocate them: ``meta`` (shape, dtype, on an accelerator
    or not) and ``paths`` (where each sits in the tree)."""
    paths: list[str] = []

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            paths.append(path)
            return {_TENSOR: len(tensors) - 1}
        if isinstance(x, dict):
            return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{path}/{i}") for i, v in enumerate(x))
        return x

    out = walk(tree, "")
    return {"tree": out, "meta": _meta(tensors), "paths": paths}


def _meta(tensors: list[torch.Tensor]) -> list[tuple[list[int], str, bool]]:
    return [
        (list(t.shape), str(t.dtype).removeprefix("torch."), t.device.type != "cpu")
        for t in tensors
    ]


def _allocate(meta: list[tuple[list[int], str, bool]], device: torch.device) -> list[torch.Tensor]:
    # An optimizer's CPU tensors (Adam's step counts) stay on the CPU.
    return [
        torch.empty(shape, dtype=getattr(torch, dtype), device=device if on_acc else "cpu")
        for shape, dtype, on_acc in meta
    ]


def _fill(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: _fill(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill(v, tensors) for v in tree)
    return tree


# A tensor this big goes by itself, straight from and into its own storage: a
# copy into a flat buffer and out again costs more than the collective's
# per-call overhead. Smaller ones share one buffer per (device, dtype).
DIRECT_BYTES = 1 << 20


def _broadcast_tensors(group: WorkerGroup, tensors: list[torch.Tensor], src: int) -> int:
    """Broadcast ``tensors`` from ``src`` into every rank's own; returns the bytes moved."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    moved = 0
    with torch.no_grad():
        # The same order on every rank: the tensors' own order, then buckets
        # in the order of their first tensor.
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if nbytes >= DIRECT_BYTES and t.is_contiguous():
                group.broadcast(t, src)
                moved += nbytes
            else:
                buckets[(t.device, t.dtype)].append(t)
        for bucket in buckets.values():
            if group.rank == src:
                flat = torch.cat([t.reshape(-1) for t in bucket])
            else:
                flat = torch.empty(
                    sum(t.numel() for t in bucket), dtype=bucket[0].dtype, device=bucket[0].device
                )
            group.broadcast(flat, src)
            moved += flat.numel() * flat.element_size()
            if group.rank != src:
                offset = 0
                for t in bucket:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view_as(t))
                    offset += n
    return moved


def _device_of(modules: list[torch.nn.Module]) -> torch.device:
    for module in modules:
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def _broadcast_module(group: WorkerGroup, module: torch.nn.Module, src: int) -> int:
    # Receivers copy into their own parameters and buffers, in place.
    return _broadcast_tensors(group, list(module.state_dict().values()), src)
