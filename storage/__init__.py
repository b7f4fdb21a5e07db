"""Checkpoint store on any fsspec URL: atomic commit, checksums, async save, fencing.

from storage import CheckpointStore
store = CheckpointStore("s3://bucket/run1")   # or file://..., memory://...
store.save(step, state)                      # atomic: fully there or not at all
handle = store.save_async(step, state)       # returns after a CPU snapshot
step, state = store.load()                   # newest checkpoint that verifies

The names below are imported on first use: `storage.errors` and the CLI
parser load without torch, so `elastic --help` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CheckpointExistsError": "storage.errors",
    "CheckpointInfo": "storage.info",
    "CheckpointNotFoundError": "storage.errors",
    "CheckpointStore": "storage.store",
    "CorruptCheckpointError": "storage.errors",
    "Fence": "storage.store",
    "FenceError": "storage.errors",
    "FileProblem": "storage.reader",
    "InvalidArgumentError": "storage.errors",
    "InvalidURLError": "storage.errors",
    "LoadedCheckpoint": "storage.info",
    "MissingPartsError": "storage.errors",
    "RetryPolicy": "storage.retry",
    "SaveAbandonedError": "storage.errors",
    "SaveHandle": "storage.handle",
    "SaveTimeoutError": "storage.errors",
    "StaleWriterError": "storage.errors",
    "StateMismatchError": "storage.errors",
    "StepReport": "storage.info",
    "StorageAccessError": "storage.errors",
    "StorageError": "storage.errors",
    "StorageUnavailableError": "storage.errors",
    "StoreConfig": "storage.store",
    "UnsupportedFormatError": "storage.errors",
    "UnsupportedStateError": "storage.errors",
    "VerifyReport": "storage.info",
    "check_compatible": "storage.compat",
    "is_transient": "storage.retry",
    "load_key_file": "storage.signing",
    "Claim": "storage.claim",
    "LocationClaimedError": "storage.errors",
    "UnsafePathError": "storage.errors",
    "SignatureError": "storage.errors",
    "UnsignedError": "storage.errors",
    "BadSignatureError": "storage.errors",
}

__all__ = [
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "CorruptCheckpointError",
    "Fence",
    "FenceError",
    "FileProblem",
    "InvalidArgumentError",
    "InvalidURLError",
    "LoadedCheckpoint",
    "MissingPartsError",
    "RetryPolicy",
    "SaveAbandonedError",
    "SaveHandle",
    "SaveTimeoutError",
    "StaleWriterError",
    "StateMismatchError",
    "StepReport",
    "StorageAccessError",
    "StorageError",
    "StorageUnavailableError",
    "StoreConfig",
    "UnsupportedFormatError",
    "UnsupportedStateError",
    "VerifyReport",
    "check_compatible",
    "is_transient",
    "load_key_file",
    "Claim",
    "LocationClaimedError",
    "UnsafePathError",
    "SignatureError",
    "UnsignedError",
    "BadSignatureError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
