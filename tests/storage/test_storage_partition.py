"""The byte-balanced, deterministic partition of the replicated state across ranks."""

from __future__ import annotations

import pytest

from storage.partition import Piece, partition, split_into_files

SIZES = [("a", 1000), ("b", 7), ("c", 0), ("d", 333), ("e", 4096)]


def covered(plan: list[list[Piece]]) -> dict[str, list[tuple[int, int]]]:
    spans: dict[str, list[tuple[int, int]]] = {}
    for pieces in plan:
        for p in pieces:
            spans.setdefault(p.tensor, []).append((p.start, p.start + p.nbytes))
    return {t: sorted(s) for t, s in spans.items()}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64])
def test_every_byte_is_written_by_exactly_one_rank(world: int) -> None:
    plan = partition(SIZES, world)
    assert len(plan) == world
    for tensor, nbytes in SIZES:
        spans = covered(plan).get(tensor, [])
        assert sum(end - start for start, end in spans) == nbytes
        assert all(
            a_end == b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)
        )


@pytest.mark.parametrize("world", [2, 3, 5, 64])
def test_ranks_get_the_same_number_of_bytes_to_within_one(world: int) -> None:
    loads = [sum(p.nbytes for p in pieces) for pieces in partition(SIZES, world)]
    assert max(loads) - min(loads) <= 1


def test_one_huge_tensor_is_split_across_ranks() -> None:
    plan = partition([("emb", 900), ("bias", 3)], 3)
    assert [sum(p.nbytes for p in pieces) for pieces in plan] == [301, 301, 301]
    assert all(any(p.tensor == "emb" for p in pieces) for pieces in plan)


def test_the_plan_depends_only_on_its_inputs() -> None:
    assert partition(SIZES, 3) == partition(list(SIZES), 3)


def test_an_empty_state_gives_every_rank_nothing() -> None:
    assert partition([], 4) == [[], [], [], []]
    assert partition([("empty", 0)], 2) == [[], []]


def test_files_are_bounded_and_pieces_split_at_file_boundaries() -> None:
    files = split_into_files([Piece("a", 0, 250), Piece("b", 10, 60)], 100)
    assert [sum(p.nbytes for p in f) for f in files] == [100, 100, 100, 10]
    assert files[2] == [Piece("a", 200, 50), Piece("b", 10, 50)]
    assert files[3] == [Piece("b", 60, 10)]
