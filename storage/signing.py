"""Keyed manifests: an HMAC-SHA256 of a record's canonical form, under a user's key.

The plain digest in every envelope catches corruption, but anyone who can write
to the location can recompute it.  A key the writers hold and the location's
other writers do not turns the envelope into proof of origin: a store opened
with the key signs what it writes and refuses records that are unsigned or
signed with anything else.  The key is bytes handed to `CheckpointStore(url,
key=...)`, or the contents of a file (`load_key_file`, `--checkpoint-key-file`).
"""

from __future__ import annotations

import hashlib
import hmac

from storage.errors import InvalidArgumentError

SCHEME = "hmac-sha256"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096


def check_key(key: object) -> bytes:
    """`key` as bytes, or InvalidArgumentError saying why it cannot be one."""
    if not isinstance(key, (bytes, bytearray)):
        raise InvalidArgumentError(f"checkpoint key must be bytes, got {type(key).__name__}")
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"checkpoint key must be {MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes, got {len(key)}"
        )
    return bytes(key)


def load_key_file(path: str) -> bytes:
    """The key stored in `path` (one trailing newline is not part of it)."""
    if not isinstance(path, str) or not path:
        raise InvalidArgumentError(f"checkpoint key file must be a path, got {path!r}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 3)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise InvalidArgumentError(
            f"checkpoint key file {path!r} cannot be read: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    try:
        return check_key(data)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"checkpoint key file {path!r}: {exc}") from None


def sign(key: bytes, message: bytes) -> str:
    return f"{SCHEME}:{hmac.new(key, message, hashlib.sha256).hexdigest()}"


def signature_matches(key: bytes, message: bytes, signature: object) -> bool:
    """Constant-time comparison, so the check leaks nothing about the right signature."""
    return isinstance(signature, str) and hmac.compare_digest(sign(key, message), signature)
