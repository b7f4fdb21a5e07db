"""Fault-tolerant elastic training runtime for PyTorch.

The training API (``init`` for a script's own loop, ``Trainer``) imports
torch; the CLI and the coordination modules do not, so they are loaded lazily
here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ElasticSampler",
    "Job",
    "init",
    "FitResult",
    "RuntimeConfig",
    "ShardedRecords",
    "Trainer",
]

_LAZY = {
    "init": ("elastic.train.job", "init"),
    "Job": ("elastic.train.job", "Job"),
    "Trainer": ("elastic.train.runtime", "Trainer"),
    "FitResult": ("elastic.train.runtime", "FitResult"),
    "RuntimeConfig": ("elastic.train.config", "RuntimeConfig"),
    "ElasticSampler": ("elastic.train.sampler", "ElasticSampler"),
    "ShardedRecords": ("elastic.train.records", "ShardedRecords"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        import importlib

        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'elastic' has no attribute {name!r}")
