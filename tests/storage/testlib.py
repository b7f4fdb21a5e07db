"""Helpers for the checkpoint store tests: locations with raw file access, states, comparisons."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from fsspec import AbstractFileSystem

from storage import CheckpointStore, RetryPolicy, layout

# Retries that give up fast: tests inject failures on purpose.
FAST_RETRY = RetryPolicy(
    max_attempts=3, max_time_s=5.0, initial_backoff_s=0.001, max_backoff_s=0.01
)


@dataclass
class Location:
    """A checkpoint URL on one backend, plus raw access to its files (to corrupt them)."""

    url: str
    fs: AbstractFileSystem  # the raw filesystem, bypassing the store
    root: str  # the root in that filesystem's path form
    storage_options: dict[str, Any] | None = None
    share_fs: bool = False  # stores get fs= (independent memory filesystems)
    stores: list[CheckpointStore] = field(default_factory=list)

    def store(self, **kw: Any) -> CheckpointStore:
        """A new store on this location, as a separate process would open it."""
        if "fs" not in kw:
            if self.share_fs:
                kw["fs"] = self.fs
            elif self.storage_options:
                kw["storage_options"] = self.storage_options
        kw.setdefault("retry", FAST_RETRY)
        store = CheckpointStore(self.url, **kw)
        self.stores.append(store)
        return store

    def close(self) -> None:
        for store in self.stores:
            store.close(timeout=30)

    def path(self, rel: str) -> str:
        return layout.join(self.root, rel)

    def all_files(self, step: int | None = None) -> list[str]:
        """Paths relative to the root of every file (of one step)."""
        base = self.path(layout.step_dir(step)) if step is not None else self.root
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        return sorted(self.fs._strip_protocol(p)[len(root) :] for p in found)

    def data_files(self, step: int) -> list[str]:
        return [p for p in self.all_files(step) if p.endswith(".bin")]

    def manifest(self, step: int) -> str:
        return layout.join(layout.step_dir(step), layout.MANIFEST)

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write(self, rel: str, data: bytes) -> None:
        if getattr(self.fs, "local_file", False):
            self.fs.makedirs(self.path(rel).rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.path(rel), data)
        self.fs.invalidate_cache()

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(rel))

    def delete(self, rel: str) -> None:
        self.fs.rm(self.path(rel))
        self.fs.invalidate_cache()

    def flip_bit(self, rel: str, bit: int | None = None) -> None:
        data = bytearray(self.read(rel))
        bit = (len(data) * 8) // 2 + 3 if bit is None else bit
        data[bit // 8] ^= 1 << (bit % 8)
        self.write(rel, bytes(data))

    def truncate(self, rel: str, keep: int | None = None) -> None:
        data = self.read(rel)
        self.write(rel, data[: len(data) // 2 if keep is None else keep])


def rich_state(seed: int = 0) -> dict[str, Any]:
    """A model + optimizer + awkward tensors + plain values: everything must round-trip."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "tensors": {
            "bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
            "half": torch.randn(7, generator=gen).half(),
            "noncontig": torch.randn(4, 6, generator=gen).t(),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
            "ints": torch.arange(-5, 5, dtype=torch.int64),
            "bools": torch.tensor([True, False, True]),
            "complex": torch.randn(3, generator=gen, dtype=torch.complex64),
            "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        },
        "plain": {
            "step": 7,
            "lr": 0.1,
            "nan": float("nan"),
            "neg_inf": float("-inf"),
            "name": "run-1",
            "flag": True,
            "none": None,
            "list": [1, 2.5, "x", None, [True]],
            "tuple": (1, (2, 3)),
            3: "int key",
            "nested": {0: {1: "deep"}, "empty": {}},
        },
    }


def per_rank_state(rank: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return {
        "rng": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=gen),
        "cursor": rank * 10,
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous(), b.contiguous()
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same(expected: Any, actual: Any, path: str = "state") -> None:
    """Exact equality: container types, key order and types, dtypes, shapes, bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {actual!r}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert _same_bits(expected, actual), f"{path}: tensor bits differ"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: expected a dict, got {type(actual)}"
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), f"{path}: length differs"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}[{i}]")
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        if isinstance(expected, float) and math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not nan"
        else:
            assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def save_ranks(
    loc: Location,
    step: int,
    state: dict[str, Any],
    world_size: int,
    *,
    ranks: list[int] | None = None,
    per_rank: Callable[[int], dict[str, Any]] = per_rank_state,
    timeout: float = 60.0,
    **save_kw: Any,
) -> dict[int, Any]:
    """Save as `world_size` ranks at once (threads, one store each, like processes);
    returns rank -> CheckpointInfo or the exception that rank's save raised."""
    ranks = list(range(world_size)) if ranks is None else ranks
    stores = {r: loc.store() for r in ranks}
    results: dict[int, Any] = {}
    with ThreadPoolExecutor(len(ranks)) as pool:
        futures = {
            r: pool.submit(
                stores[r].save,
                step,
                state,
                rank=r,
                world_size=world_size,
                per_rank_state=per_rank(r),
                timeout=timeout,
                **save_kw,
            )
            for r in ranks
        }
        for r, future in futures.items():
            try:
                results[r] = future.result(timeout=timeout + 60)
            except Exception as exc:  # the caller asserts on it
                results[r] = exc
    return results
