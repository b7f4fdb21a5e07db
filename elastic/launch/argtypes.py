"""Types of command-line values, shared by every ``elastic`` command.

Each one refuses what no setting can mean, NaN and infinities included
(``float("nan") <= 0`` is False, so a plain ``> 0`` check lets NaN through and
a NaN lease TTL or timeout never expires).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _checked(text: str, parse: Callable[[str], T], ok: Callable[[T], bool], what: str) -> T:
    value = parse(text)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive(text: str) -> float:
    """A finite number > 0 (a tolerance, a scale)."""
    return _checked(text, _number, lambda v: v > 0, "> 0")


def seconds(text: str) -> float:
    """A duration > 0."""
    return _checked(text, _number, lambda v: v > 0, "> 0 seconds")


def seconds_or_zero(text: str) -> float:
    """A duration >= 0."""
    return _checked(text, _number, lambda v: v >= 0, ">= 0 seconds")


def factor(text: str) -> float:
    """A multiplier >= 1."""
    return _checked(text, _number, lambda v: v >= 1, ">= 1")


def count(text: str) -> int:
    """A count >= 1."""
    return _checked(text, _integer, lambda v: v >= 1, ">= 1")


def count_or_zero(text: str) -> int:
    """A count >= 0."""
    return _checked(text, _integer, lambda v: v >= 0, ">= 0")


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    return _checked(text, _integer, lambda v: 1 <= v <= 65535, "a port between 1 and 65535")
