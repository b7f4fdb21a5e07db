"""Check that a loaded state fits a target (a model, an optimizer, any state dict),
or is identical to another state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from storage.errors import StateMismatchError
from storage.serialize import encode_tree, flat_bytes, format_path

_MAX_LISTED = 20


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _compare(target: Any, loaded: Any, path: tuple[Any, ...], strict: bool, out: list[str]) -> None:
    where = format_path(path)
    if isinstance(target, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            out.append(f"{where}: target is a tensor, checkpoint has {type(loaded).__name__}")
        elif _shape(loaded) != _shape(target):
            out.append(
                f"{where}: shape {list(loaded.shape)} in checkpoint, {list(target.shape)} in target"
            )
        elif loaded.dtype != target.dtype:
            out.append(f"{where}: dtype {loaded.dtype} in checkpoint, {target.dtype} in target")
        return
    if isinstance(target, Mapping):
        if not isinstance(loaded, Mapping):
            out.append(f"{where}: target is a dict, checkpoint has {type(loaded).__name__}")
            return
        if strict:
            out.extend(
                f"{format_path((*path, k))}: missing from checkpoint"
                for k in target
                if k not in loaded
            )
            out.extend(
                f"{format_path((*path, k))}: in checkpoint but not in target"
                for k in loaded
                if k not in target
            )
        for key in target:
            if key in loaded:
                _compare(target[key], loaded[key], (*path, key), strict, out)
        return
    if isinstance(target, (list, tuple)):
        if not isinstance(loaded, (list, tuple)):
            out.append(f"{where}: target is a sequence, checkpoint has {type(loaded).__name__}")
        elif len(loaded) != len(target):
            out.append(f"{where}: {len(loaded)} items in checkpoint, {len(target)} in target")
        else:
            for i, (t, v) in enumerate(zip(target, loaded, strict=True)):
                _compare(t, v, (*path, i), strict, out)


def check_compatible(target: Any, loaded: Any, *, strict: bool = True) -> None:
    """Raise StateMismatchError naming every tensor whose shape or dtype differs and
    (with `strict`) every key present on one side only.  `target` may be a module or
    optimizer (its `state_dict()` is used) or a state dict; plain values may differ."""
    if not isinstance(target, (Mapping, list, tuple, torch.Tensor)) and callable(
        getattr(target, "state_dict", None)
    ):
        target = target.state_dict()
    problems: list[str] = []
    _compare(target, loaded, (), strict, problems)
    if problems:
        shown = problems[:_MAX_LISTED]
        more = len(problems) - len(shown)
        suffix = f"; and {more} more" if more else ""
        raise StateMismatchError(
            f"checkpoint does not fit the target ({len(problems)} problem(s)): "
            + "; ".join(shown)
            + suffix
        )


def _flatten(state: Any) -> tuple[Any, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []

    def add(_path: tuple[Any, ...], t: torch.Tensor) -> str:
        tensors.append(t)
        return str(len(tensors) - 1)

    return encode_tree(state, add), tensors


def same_state(a: Any, b: Any) -> bool:
    """Whether two states are identical: same structure and keys (in order), same plain
    values, and tensors of the same dtype and shape with the same bytes (so NaNs and
    -0.0 compare as stored, not as numbers)."""
    tree_a, tensors_a = _flatten(a)
    tree_b, tensors_b = _flatten(b)
    if tree_a != tree_b or len(tensors_a) != len(tensors_b):
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(flat_bytes(x), flat_bytes(y))
        for x, y in zip(tensors_a, tensors_b, strict=True)
    )
