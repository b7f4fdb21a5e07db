"""Each invariant check on synthetic artifacts: it holds on good data and fails on bad."""

from __future__ import annotations

import json
import os

import torch

from chaos import invariants as inv


def _params(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g) * scale, "b": torch.zeros(3)}


# -- 1. params ------------------------------------------------------------------------


def test_params_within_tolerance_hold() -> None:
    ref = _params()
    near = {k: v + 1e-7 for k, v in ref.items()}
    check = inv.check_params({"m0": near, "m1": ref}, ref)
    assert check.held, check.detail


def test_params_beyond_tolerance_name_the_worker() -> None:
    ref = _params()
    off = {k: v.clone() for k, v in ref.items()}
    off["w"][0, 0] += 1e-3
    check = inv.check_params({"m0": ref, "m1": off}, ref)
    assert not check.held
    assert "m1" in check.detail and "1 of 2" in check.detail


def test_params_without_finishers_do_not_hold() -> None:
    assert not inv.check_params({}, _params()).held


def test_params_with_other_keys_do_not_hold() -> None:
    ref = _params()
    assert not inv.check_params({"m0": {"w": ref["w"]}}, ref).held


def test_load_params_reads_one_file_per_member(tmp_path) -> None:
    torch.save(_params(), tmp_path / "job-0.pt")
    torch.save(_params(2.0), tmp_path / "job-1.pt")
    loaded = inv.load_params(str(tmp_path))
    assert sorted(loaded) == ["job-0", "job-1"]
    assert inv.max_param_diff(loaded["job-0"], _params()) == 0.0


# -- 2. exactly once ------------------------------------------------------------------------


def _write_ledger(directory, member: str, records: list[dict]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"ledger-{member}.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _rec(step: int, gen: int, rank: int, world: int, ids: list[int], epoch: int = 0) -> dict:
    return {"step": step, "epoch": epoch, "gen": gen, "rank": rank, "world": world, "ids": ids}


# 10 samples, batch 4, no shuffle in these synthetic ledgers: steps take
# [0..3], [4..7], [8, 9] of epoch 0.
EXPECTED = {0: list(range(10))}


def test_rolled_back_step_counts_from_the_newest_generation(tmp_path) -> None:
    d = tmp_path / "seg0"
    _write_ledger(
        d,
        "a",
        [
            _rec(0, 1, 0, 2, [0, 1]),
            _rec(1, 1, 0, 2, [4, 5]),
            _rec(1, 2, 0, 1, [4, 5, 6, 7]),
            _rec(2, 2, 0, 1, [8, 9]),
        ],
    )
    # b died in step 1 of generation 1 after logging its share: that attempt was redone.
    _write_ledger(d, "b", [_rec(0, 1, 1, 2, [2, 3]), _rec(1, 1, 1, 2, [6, 7])])
    records = inv.read_ledgers([str(d)])
    check = inv.check_exactly_once(records, EXPECTED, 3)
    assert check.held, check.detail
    assert inv.steps_redone(records) == 1


def test_a_share_that_was_not_resplit_is_reported_missing(tmp_path) -> None:
    d = tmp_path / "seg0"
    # After the World shrank to 1 the survivor kept the half it had: 6, 7 never seen.
    _write_ledger(
        d, "a", [_rec(0, 1, 0, 2, [0, 1]), _rec(1, 2, 0, 1, [4, 5]), _rec(2, 2, 0, 1, [8, 9])]
    )
    _write_ledger(d, "b", [_rec(0, 1, 1, 2, [2, 3])])
    check = inv.check_exactly_once(inv.read_ledgers([str(d)]), EXPECTED, 3)
    assert not check.held
    assert "never seen [6, 7]" in check.detail


def test_duplicates_and_foreign_samples_are_reported(tmp_path) -> None:
    d = tmp_path / "seg0"
    _write_ledger(
        d,
        "a",
        [
            _rec(0, 1, 0, 1, [0, 1, 2, 3]),
            _rec(1, 1, 0, 1, [4, 5, 6, 3]),
            _rec(2, 1, 0, 1, [8, 9, 42]),
        ],
    )
    check = inv.check_exactly_once(inv.read_ledgers([str(d)]), EXPECTED, 3)
    assert not check.held
    assert "more than once [3]" in check.detail
    assert "not in this epoch [42]" in check.detail and "never seen [7]" in check.detail


def test_a_resumed_segment_supersedes_higher_generations_of_the_first(tmp_path) -> None:
    # Segment 0 reached generation 5 and trained step 2 wrongly; the resumed job
    # (generations start again at 1) redid it correctly: its attempt counts.
    _write_ledger(
        tmp_path / "seg0",
        "a",
        [_rec(0, 5, 0, 1, [0, 1, 2, 3]), _rec(1, 5, 0, 1, [4, 5, 6, 7]), _rec(2, 5, 0, 1, [8, 8])],
    )
    _write_ledger(tmp_path / "seg1", "x", [_rec(2, 1, 0, 1, [8, 9])])
    records = inv.read_ledgers([str(tmp_path / "seg0"), str(tmp_path / "seg1")])
    assert inv.check_exactly_once(records, EXPECTED, 3).held
    # Read in the wrong order the stale attempt would win: the segment order matters.
    swapped = inv.read_ledgers([str(tmp_path / "seg1"), str(tmp_path / "seg0")])
    assert not inv.check_exactly_once(swapped, EXPECTED, 3).held


def test_a_torn_last_ledger_line_is_ignored(tmp_path) -> None:
    d = tmp_path / "seg0"
    _write_ledger(
        d,
        "a",
        [_rec(0, 1, 0, 1, [0, 1, 2, 3]), _rec(1, 1, 0, 1, [4, 5, 6, 7]), _rec(2, 1, 0, 1, [8, 9])],
    )
    with open(d / "ledger-a.jsonl", "a") as f:
        f.write('{"step": 3, "ep')
    assert inv.check_exactly_once(inv.read_ledgers([str(d)]), EXPECTED, 3).held


def test_a_step_never_completed_is_reported(tmp_path) -> None:
    d = tmp_path / "seg0"
    _write_ledger(d, "a", [_rec(0, 1, 0, 1, [0, 1, 2, 3]), _rec(1, 1, 0, 1, [4, 5, 6, 7])])
    check = inv.check_exactly_once(inv.read_ledgers([str(d)]), EXPECTED, 3)
    assert not check.held and "steps never completed: [2]" in check.detail


def test_expected_epochs_follow_the_sampler() -> None:
    epochs = inv.expected_epochs(10, 4, seed=3, total_steps=6)
    assert sorted(epochs[0]) == list(range(10)) and sorted(epochs[1]) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled per epoch


# -- 3. checkpoints --------------------------------------------------------------------------


def _store(steps: dict[int, float], bad: dict[int, str] | None = None) -> inv.StoreState:
    return inv.StoreState({s: {"generation": 1, "created": t} for s, t in steps.items()}, bad or {})


def test_intact_checkpoints_and_newest_restore_hold() -> None:
    final = _store({10: 1.0, 20: 2.0, 48: 9.0})
    restores = [inv.Restore(t=3.0, step=20, segment=1)]
    check = inv.check_checkpoints(final, [_store({10: 1.0, 20: 2.0})], restores, [1], 48, set())
    assert check.held, check.detail


def test_a_torn_committed_checkpoint_is_a_violation() -> None:
    final = _store({10: 1.0, 20: 2.0, 48: 9.0}, bad={20: "size mismatch"})
    check = inv.check_checkpoints(final, [], [], [], 48, set())
    assert not check.held and "step 20 does not verify" in check.detail


def test_damage_injected_on_purpose_must_be_skipped_by_restores() -> None:
    final = _store({10: 1.0, 20: 2.0, 48: 9.0}, bad={20: "checksum mismatch"})
    ok = inv.check_checkpoints(final, [], [inv.Restore(3.0, 10, 1)], [1], 48, {20})
    assert ok.held, ok.detail
    wrong = inv.check_checkpoints(final, [], [inv.Restore(3.0, 20, 1)], [1], 48, {20})
    assert not wrong.held and "newest intact committed step then was 10" in wrong.detail


def test_restoring_an_older_step_than_the_newest_intact_is_a_violation() -> None:
    final = _store({10: 1.0, 20: 2.0, 48: 9.0})
    check = inv.check_checkpoints(final, [], [inv.Restore(3.0, 10, 1)], [1], 48, set())
    assert not check.held and "restored step 10" in check.detail


def test_vanished_and_missing_final_checkpoints_are_violations() -> None:
    final = _store({10: 1.0})
    check = inv.check_checkpoints(final, [_store({10: 1.0, 20: 2.0})], [], [1], 48, set())
    assert not check.held
    assert "[20] vanished" in check.detail
    assert "final step 48 was not committed" in check.detail
    assert "resumed segment 1 restored nothing" in check.detail


# -- 4. fencing ------------------------------------------------------------------------------


def test_commit_by_the_current_generation_holds() -> None:
    commits = [inv.CommitRecord("j", 10, 1, 1, 100), inv.CommitRecord("j", 48, 2, 2, 200)]
    final = inv.StoreState(
        {10: {"generation": 1, "created": 0.0}, 48: {"generation": 2, "created": 0.0}}, {}
    )
    assert inv.check_fencing(commits, final).held


def test_commit_from_stale_generation_is_a_violation() -> None:
    commits = [inv.CommitRecord("j", 10, 1, 2, 100)]
    final = inv.StoreState({10: {"generation": 1, "created": 0.0}}, {})
    check = inv.check_fencing(commits, final)
    assert not check.held
    assert "generation 1 accepted while generation 2 was current" in check.detail


def test_checkpoint_without_a_fenced_commit_is_a_violation() -> None:
    final = inv.StoreState({10: {"generation": 3, "created": 0.0}}, {})
    check = inv.check_fencing([], final)
    assert not check.held and "without a fenced commit record" in check.detail


def test_unreadable_history_does_not_hold() -> None:
    assert not inv.check_fencing(None, inv.StoreState({}, {})).held


def test_read_commits_replays_each_version_against_the_generation_then(
    etcd_server, make_client
) -> None:
    client = make_client(etcd_server.url)
    root = "/chaos-test-fence/"
    job = f"{root}job/"
    client.put(job + "ctl/gen", "1")
    client.put(job + "commits/000000000010", json.dumps({"step": 10, "generation": 1}))
    client.put(job + "ctl/gen", "2")
    # A zombie of generation 1 overwrites the record after generation 2 formed.
    client.put(job + "commits/000000000010", json.dumps({"step": 10, "generation": 1}))
    client.put(job + "commits/000000000020", json.dumps({"step": 20, "generation": 2}))
    commits = inv.read_commits(client, root)
    assert [(c.step, c.generation, c.current) for c in commits] == [
        (10, 1, 1),
        (10, 1, 2),
        (20, 2, 2),
    ]
    assert [c.stale for c in commits] == [False, True, False]


# -- 5. no hang ------------------------------------------------------------------------------


def test_a_run_stopped_at_its_bound_is_a_hang() -> None:
    check = inv.check_no_hang(False, 60.0, 60.0, [None])
    assert not check.held and "bound of 60s" in check.detail
    assert inv.check_no_hang(True, 20.0, 60.0, [0]).held


def test_a_job_that_failed_has_no_final_parameters_even_if_workers_wrote_some() -> None:
    ref = _params()
    check = inv.check_params({"m0": ref}, ref, unfinished="launcher exit code(s) 1")
    assert not check.held and "did not finish: launcher exit code(s) 1" in check.detail
