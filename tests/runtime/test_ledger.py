"""The ledger check finds missing and duplicated samples, and honours redone steps."""

from __future__ import annotations

from elastic.train.ledger import LedgerWriter, check_ledger


def write(tmp_path, member, **rec):
    w = LedgerWriter(str(tmp_path), member)
    w.record(**rec)
    w.close()


def test_complete_epoch_passes(tmp_path):
    write(tmp_path, "a", step=0, epoch=0, generation=1, rank=0, world_size=2, ids=[0, 1])
    write(tmp_path, "b", step=0, epoch=0, generation=1, rank=1, world_size=2, ids=[2, 3])
    assert check_ledger(str(tmp_path), 4, [0]).ok


def test_missing_and_duplicated_samples_are_reported(tmp_path):
    write(tmp_path, "a", step=0, epoch=0, generation=1, rank=0, world_size=2, ids=[0, 1])
    write(tmp_path, "b", step=0, epoch=0, generation=1, rank=1, world_size=2, ids=[1])
    report = check_ledger(str(tmp_path), 4, [0])
    assert not report.ok
    assert report.missing == {0: [2, 3]} and report.duplicated == {0: [1]}


def test_a_redone_step_counts_from_its_newest_generation(tmp_path):
    # Generation 1 attempted step 0 and failed half-way; generation 2 redid it.
    write(tmp_path, "a", step=0, epoch=0, generation=1, rank=0, world_size=2, ids=[0, 1])
    write(tmp_path, "a", step=0, epoch=0, generation=2, rank=0, world_size=1, ids=[0, 1, 2, 3])
    assert check_ledger(str(tmp_path), 4, [0]).ok


def test_torn_last_line_of_a_killed_writer_is_ignored(tmp_path):
    write(tmp_path, "a", step=0, epoch=0, generation=1, rank=0, world_size=1, ids=[0, 1])
    with open(tmp_path / "ledger-a.jsonl", "a") as f:
        f.write('{"step": 1, "epo')
    assert check_ledger(str(tmp_path), 2, [0]).ok
