"""The validation ledger's check: each evaluation's result counts every sample once."""

from __future__ import annotations

from elastic.train.ledger import LedgerWriter, check_val_ledger

N = 10


def _write(directory, member, *lines):
    w = LedgerWriter(str(directory), member, kind="val")
    try:
        for phase, rank, ids in lines:
            w.record(step=20, epoch=0, generation=3, rank=rank, world_size=2, ids=ids, phase=phase)
    finally:
        w.close()


def test_an_exchange_of_every_rank_chunks_is_exactly_once(tmp_path):
    _write(tmp_path, "a", ("world", 0, [0, 1, 2, 6, 7, 8]), ("result", 0, []))
    _write(tmp_path, "b", ("world", 1, [3, 4, 5, 9]), ("result", 1, []))
    report = check_val_ledger(str(tmp_path), N)
    assert report.ok, report.problems
    assert report.evaluations == {20: 2}


def test_a_survivor_that_finished_alone_is_exactly_once(tmp_path):
    _write(tmp_path, "a", ("world", 0, [0, 1, 2, 6, 7, 8]), ("alone", 0, [3, 4, 5, 9]))
    _write(tmp_path, "b", ("world", 1, [3, 4, 5, 9]))  # then it died
    assert check_val_ledger(str(tmp_path), N).ok


def test_a_result_missing_a_rank_chunks_is_reported(tmp_path):
    _write(tmp_path, "a", ("world", 0, [0, 1, 2, 6, 7, 8]), ("result", 0, []))
    report = check_val_ledger(str(tmp_path), N)
    assert not report.ok
    assert "4 samples missing" in report.problems[0], report.problems


def test_a_chunk_counted_twice_is_reported(tmp_path):
    _write(tmp_path, "a", ("world", 0, [0, 1, 2, 6, 7, 8]), ("alone", 0, [3, 4, 5, 6, 9]))
    report = check_val_ledger(str(tmp_path), N)
    assert not report.ok and "1 counted twice" in report.problems[0], report.problems
