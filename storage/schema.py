"""Typed, bounded reads of the fields of a decoded JSON record.

A manifest or part record comes from a location others may write to, and a
resealed one passes its digest: every field is checked here for type and
range before anything uses it, so that a bad value becomes a
CorruptCheckpointError naming the field rather than a TypeError, a huge
allocation or an out-of-range slice deeper down.
"""

from __future__ import annotations

import math
import re
from typing import Any

from storage.errors import CorruptCheckpointError

MAX_INT = 2**62  # steps, generations, sizes, offsets: far beyond anything real
MAX_WORLD = 2**20
MAX_NAME_CHARS = 4096  # ids and tensor ids
MAX_DIMS = 64
_CHECKSUM_RE = re.compile(r"crc32:[0-9a-f]{8}|sha256:[0-9a-f]{64}")


class Fields:
    """A JSON object read field by field; errors name `where` and the field."""

    def __init__(self, data: Any, where: str, what: str) -> None:
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{where}: {what} is not an object")
        self.data, self.where, self.what = data, where, what

    def bad(self, key: str, value: Any, expected: str) -> CorruptCheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:80] + "..."
        return CorruptCheckpointError(
            f"{self.where}: {self.what} field {key!r} is {shown}, expected {expected}"
        )

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise CorruptCheckpointError(f"{self.where}: {self.what} has no field {key!r}")
        return self.data[key]

    def int(self, key: str, low: int = 0, high: int = MAX_INT) -> int:
        return checked_int(self.get(key), low, high, lambda v, e: self.bad(key, v, e))

    def ints(self, key: str, values: list[Any]) -> tuple[int, ...]:
        """Each of `values` (the items of field `key`) as an int in [0, MAX_INT]."""
        return tuple(
            checked_int(v, 0, MAX_INT, lambda val, e: self.bad(key, val, e)) for v in values
        )

    def str(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
            raise self.bad(key, value, f"a string of at most {MAX_NAME_CHARS} characters")
        return value

    def number(self, key: str) -> float:
        value = self.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise self.bad(key, value, "a finite number")
        return float(value)

    def list(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.bad(key, value, "a list")
        return value

    def object(self, key: str) -> dict[str, Any]:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self.bad(key, value, "an object")
        return value

    def checksum(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not _CHECKSUM_RE.fullmatch(value):
            raise self.bad(key, value, "'crc32:<8 hex>' or 'sha256:<64 hex>'")
        return value


def checked_int(value: Any, low: int, high: int, bad: Any) -> int:
    """`value` if it is an int (not a bool) in [low, high], else `bad(value, expected)`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(value, f"an int in [{low}, {high}]")
    return value
