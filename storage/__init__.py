"""Checkpoint store on any fsspec URL: atomic commit, checksums, async save, fencing.

from storage import CheckpointStore
store = CheckpointStore("s3://bucket/run1")   # or file://..., memory://...
store.save(step, state)                      # atomic: fully there or not at all
handle = store.save_async(step, state)       # returns after a CPU snapshot
step, state = store.load()                   # newest checkpoint that verifies
"""

from storage.compat import check_compatible
from storage.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FenceError,
    InvalidArgumentError,
    InvalidURLError,
    MissingPartsError,
    SaveAbandonedError,
    SaveTimeoutError,
    StaleWriterError,
    StateMismatchError,
    StorageAccessError,
    StorageError,
    StorageUnavailableError,
    UnsupportedFormatError,
    UnsupportedStateError,
)
from storage.handle import SaveHandle
from storage.info import CheckpointInfo, LoadedCheckpoint, StepReport, VerifyReport
from storage.reader import FileProblem
from storage.retry import RetryPolicy, is_transient
from storage.store import CheckpointStore, Fence, StoreConfig

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
]
