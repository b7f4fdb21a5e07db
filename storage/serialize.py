"""State trees <-> JSON plus a list of tensors; tensors <-> raw bytes.

A state is a nested structure of dicts, lists and tuples whose leaves are
tensors or plain JSON values.  `encode_tree` turns it into a JSON-able tree in
which each tensor is replaced by a reference `{"t": id}` and collects the
tensors; `decode_tree` reverses it.  Nothing is pickled, so loading a
checkpoint never executes code.

Tagged nodes keep the round trip exact:
    dict   -> {"d": [[key, value], ...]}   keys keep their JSON type (str, int, ...)
    list   -> {"l": [...]}
    tuple  -> {"u": [...]}
    tensor -> {"t": "<id>"}
    float  -> {"f": "nan" | "inf" | "-inf"} for non-finite values, else the number
Other JSON values (str, int, bool, None, finite float) are stored as they are.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Callable, Container, Mapping
from typing import Any

import torch

from storage.errors import UnsupportedStateError

_DTYPES: dict[str, torch.dtype] = {
    name: value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
}
# Canonical names ("float32", not the alias "float").
_DTYPE_NAMES: dict[torch.dtype, str] = {
    dt: str(dt).removeprefix("torch.") for dt in _DTYPES.values()
}
_KEY_TYPES = (str, int, float, bool, type(None))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called `name`; only real dtypes are accepted, never arbitrary attributes."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise UnsupportedStateError(f"unknown tensor dtype {name!r} in checkpoint")
    return dtype


_LOADABLE: frozenset[str] | None = None


def loadable_dtypes() -> frozenset[str]:
    """Names of the dtypes a checkpoint may hold: those a plain dense tensor can have
    (a manifest naming a quantized or packed type is not one the writer made)."""
    global _LOADABLE
    if _LOADABLE is None:
        names = set()
        for dt, name in _DTYPE_NAMES.items():
            try:
                with warnings.catch_warnings():  # probing experimental types warns
                    warnings.simplefilter("ignore")
                    ok = not torch.empty(1, dtype=dt).is_quantized and dt.itemsize > 0
            except (RuntimeError, TypeError, ValueError):
                ok = False
            if ok:
                names.add(name)
        _LOADABLE = frozenset(names)
    return _LOADABLE


def format_path(path: tuple[Any, ...]) -> str:
    """Human-readable key path for messages: model.layer.weight, optimizer.state[0].exp_avg."""
    out = ""
    for key in path:
        if isinstance(key, str):
            out += f".{key}" if out else key
        else:
            out += f"[{key!r}]"
    return out or "<root>"


def encode_tree(
    obj: Any, add_tensor: Callable[[tuple[Any, ...], torch.Tensor], str], path: tuple = ()
) -> Any:
    """Encode `obj` as JSON-able data; `add_tensor(path, tensor)` returns the tensor's id."""
    if isinstance(obj, torch.Tensor):
        check_tensor(obj, path)
        return {"t": add_tensor(path, obj)}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"f": repr(obj)}
    if isinstance(obj, Mapping):
        items = []
        for key, value in obj.items():
            if not isinstance(key, _KEY_TYPES) or (
                isinstance(key, float) and not math.isfinite(key)
            ):
                raise UnsupportedStateError(
                    f"state key {key!r} of type {type(key).__name__} at "
                    f"{format_path(path)} is not supported (use str or int keys)"
                )
            items.append([key, encode_tree(value, add_tensor, (*path, key))])
        return {"d": items}
    if isinstance(obj, (list, tuple)):
        tag = "u" if isinstance(obj, tuple) else "l"
        return {tag: [encode_tree(v, add_tensor, (*path, i)) for i, v in enumerate(obj)]}
    raise UnsupportedStateError(
        f"state value at {format_path(path)} has unsupported type "
        f"{type(obj).__module__}.{type(obj).__qualname__}; leaves must be tensors or "
        "int, float, str, bool, None (in dicts, lists, tuples)"
    )


def decode_tree(node: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    """Inverse of `encode_tree`; `tensor(id)` supplies each tensor."""
    if isinstance(node, dict):
        if "d" in node:
            return {key: decode_tree(value, tensor) for key, value in node["d"]}
        if "l" in node:
            return [decode_tree(v, tensor) for v in node["l"]]
        if "u" in node:
            return tuple(decode_tree(v, tensor) for v in node["u"])
        if "t" in node:
            return tensor(node["t"])
        if "f" in node:
            return float(node["f"])
        raise ValueError(f"unknown node {sorted(node)!r} in encoded state")
    if isinstance(node, list):
        raise ValueError("bare list in encoded state")
    return node


MAX_TREE_DEPTH = 100  # a real state is a handful of levels; decode_tree recurses


def check_encoded_tree(node: Any, tensor_ids: Container[str]) -> None:
    """Raise ValueError unless `node` is exactly what `encode_tree` produces, nested at
    most MAX_TREE_DEPTH deep and referring only to tensors in `tensor_ids`: then
    `decode_tree` on it cannot fail or recurse without bound."""
    stack: list[tuple[Any, int]] = [(node, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise ValueError(f"encoded state nested deeper than {MAX_TREE_DEPTH}")
        if item is None or isinstance(item, (bool, int, str)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("non-finite number outside an {'f': ...} node")
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"malformed node of type {type(item).__name__} in encoded state")
        ((tag, value),) = item.items()
        if tag == "t":
            if not isinstance(value, str) or value not in tensor_ids:
                raise ValueError(f"reference to unknown tensor {value!r}")
        elif tag == "f":
            if value not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad non-finite float {value!r}")
        elif tag in ("l", "u") and isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif tag == "d" and isinstance(value, list):
            for pair in value:
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or not isinstance(pair[0], _KEY_TYPES)
                ):
                    raise ValueError("malformed dict item in encoded state")
                stack.append((pair[1], depth + 1))
        else:
            raise ValueError(f"unknown node {tag!r} in encoded state")


def check_tensor(t: torch.Tensor, path: tuple[Any, ...]) -> None:
    """Reject tensors whose raw bytes would not round-trip exactly."""
    problem = None
    if t.layout != torch.strided:
        problem = f"layout {t.layout} (only dense tensors)"
    elif t.is_quantized:
        problem = "a quantized tensor"
    elif type(t) not in (torch.Tensor, torch.nn.Parameter):
        problem = f"a tensor subclass {type(t).__name__} (save its local tensor instead)"
    elif t.device.type == "meta":
        problem = "a meta tensor (it has no data)"
    elif t.dtype not in _DTYPE_NAMES:
        problem = f"dtype {t.dtype}"
    if problem:
        raise UnsupportedStateError(f"tensor at {format_path(path)} is {problem}")


def device_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a tensor's elements in row-major order, on its own device
    (copies only if the tensor is not contiguous)."""
    t = t.detach().contiguous()
    if not t.numel():
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.reshape(-1).view(torch.uint8)


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """`device_bytes` on the CPU (copies a tensor that lives elsewhere)."""
    data = device_bytes(t)
    return data if data.device.type == "cpu" else data.cpu()


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor's memory; keeps the tensor alive."""
    if t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("byte_view needs a 1-D contiguous CPU uint8 tensor")
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    # torch has no buffer protocol and numpy is optional; ctypes gives a zero-copy view.
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array._owner = t  # type: ignore[attr-defined]  # the view must not outlive the tensor
    return memoryview(array).cast("B")
