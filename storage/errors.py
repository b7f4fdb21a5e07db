"""The storage package's errors: one base class, one subclass per way to fail.

Callers that only care whether the checkpoint store failed catch `StorageError`;
the runtime distinguishes a few cases (a stale writer, a missing step) by type.
Messages name the offending value (URL, step, file, rank) so that one line of
log is enough to act on.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by the checkpoint store."""


class InvalidArgumentError(StorageError, ValueError):
    """A bad argument or configuration value; the message names it."""


class InvalidURLError(InvalidArgumentError):
    """The URL is malformed, its scheme is unknown, or its backend is not installed."""


class StorageUnavailableError(StorageError):
    """Storage could not be reached or kept failing after bounded retries."""


class StorageAccessError(StorageError):
    """The location exists but may not be written or read (read-only, permissions)."""


class CheckpointNotFoundError(StorageError):
    """No committed checkpoint matches (empty location, or an unknown step)."""


class CheckpointExistsError(StorageError):
    """Another writer already committed this step."""


class CorruptCheckpointError(StorageError):
    """A committed checkpoint failed verification (missing file, size, checksum)."""


class UnsafePathError(CorruptCheckpointError):
    """A path from the location (a manifest, a part record, a listing, a symlink) would
    reach outside it, or is not a regular file where one is read; nothing was touched."""


class SignatureError(CorruptCheckpointError):
    """A store opened with a key found a manifest or part record it cannot trust."""


class UnsignedError(SignatureError):
    """The record carries no signature, and the store was given a key."""


class BadSignatureError(SignatureError):
    """The record's signature does not match the key (tampered, or another key)."""


class LocationClaimedError(StorageError):
    """Another launch of a job owns the location (its CLAIM.json names someone else)."""


class UnsupportedFormatError(StorageError):
    """A manifest was written by a newer or unknown version of the format."""


class StaleWriterError(StorageError):
    """The fence said this writer's generation is no longer current; nothing committed."""


class FenceError(StorageError):
    """The fence callback raised; nothing was committed."""


class MissingPartsError(StorageError, TimeoutError):
    """The committer timed out waiting for the parts of other ranks."""


class SaveAbandonedError(StorageError):
    """The committer stopped waiting for parts because its caller said so."""


class SaveTimeoutError(StorageError, TimeoutError):
    """Waiting for an asynchronous save exceeded the given timeout."""


class UnsupportedStateError(StorageError, TypeError):
    """The state holds a value the store cannot persist exactly; names its key path."""


class StateMismatchError(StorageError):
    """A loaded state does not fit the target (missing key, shape or dtype differs)."""
