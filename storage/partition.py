"""Which rank writes which bytes of the replicated state, and which file holds them.

Every rank computes the same plan from the same inputs (tensor ids in a
canonical order, their byte sizes, the world size) with no communication: the
tensors' bytes are laid end to end and cut into `world_size` contiguous ranges
of equal length (to the byte).  A tensor that straddles a cut is written as two
pieces by two ranks.  The result is balanced by bytes however uneven the
tensors are (one huge embedding, many small biases).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Bytes [start, start + nbytes) of the tensor `tensor` (its row-major bytes)."""

    tensor: str
    start: int
    nbytes: int


def partition(sizes: Sequence[tuple[str, int]], world_size: int) -> list[list[Piece]]:
    """Split the concatenation of `sizes` ((tensor id, nbytes) in canonical order) into
    `world_size` byte-balanced, disjoint lists of pieces, one per rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(n for _, n in sizes)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    plan: list[list[Piece]] = [[] for _ in range(world_size)]
    offset = 0
    rank = 0
    for tensor, nbytes in sizes:
        pos = 0
        while pos < nbytes:
            while bounds[rank + 1] <= offset + pos:
                rank += 1
            take = min(nbytes - pos, bounds[rank + 1] - (offset + pos))
            plan[rank].append(Piece(tensor, pos, take))
            pos += take
        offset += nbytes
    return plan


def split_into_files(pieces: Sequence[Piece], max_file_bytes: int) -> list[list[Piece]]:
    """Group pieces into files of at most `max_file_bytes`, splitting a piece at a file
    boundary, so that files can be written in parallel and retried individually."""
    if max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be >= 1, got {max_file_bytes}")
    files: list[list[Piece]] = []
    current: list[Piece] = []
    room = max_file_bytes
    for piece in pieces:
        start, left = piece.start, piece.nbytes
        while left > 0:
            if room == 0:
                files.append(current)
                current, room = [], max_file_bytes
            take = min(left, room)
            current.append(Piece(piece.tensor, start, take))
            start, left, room = start + take, left - take, room - take
    if current:
        files.append(current)
    return files
