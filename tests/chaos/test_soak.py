"""`elastic chaos soak`: the fault draw keeps the job within bounds; a tiny real soak passes."""

from __future__ import annotations

import json
import random

import pytest

from chaos import soak
from chaos.invariants import INVARIANTS
from chaos.run import Settings
from tests.chaos.conftest import SETTINGS
from tests.chaos.test_cli import elastic


def test_the_draw_keeps_the_worker_count_between_its_bounds() -> None:
    # Play the soak's choices against a model of their effect on the World.
    cfg = soak.SoakConfig(400, workers=3)
    rng = random.Random(7)
    size, hosts, seen = cfg.workers, 2, set()
    for i in range(cfg.faults):
        spec = soak.draw(rng, cfg, i, live=size, world=size, hosts=hosts)
        seen.add(spec.kind)
        if spec.kind in soak.REMOVES:
            assert size > cfg.low, (i, spec, size)
            size -= 1
            hosts -= spec.kind == "kill-host"
        elif spec.kind == "join":
            assert size < cfg.high
            size += spec.count
            hosts += 1
        else:
            assert spec.rank is not None and 0 <= spec.rank < size
        assert 1 <= size <= cfg.high
        if spec.kind == "kill-host":
            assert hosts >= 1
    assert seen == set(soak.SOAK_KINDS)


def test_a_low_world_gets_a_join_and_a_single_launcher_is_never_killed() -> None:
    cfg = soak.SoakConfig(10, workers=4)
    rng = random.Random(1)
    assert {soak.draw(rng, cfg, 0, live=1, world=1, hosts=2).kind for _ in range(50)} == {"join"}
    drawn = [soak.draw(rng, cfg, 0, live=5, world=4, hosts=1) for _ in range(200)]
    assert "kill-host" not in {d.kind for d in drawn} and "leave" in {d.kind for d in drawn}
    # Worker faults aim at a rank of the World, not at a worker still starting.
    assert {d.rank for d in drawn if d.rank is not None} == {0, 1, 2, 3}


def test_workers_still_starting_do_not_make_room_for_a_removal() -> None:
    # The 1200-fault soak killed the host of its last worker while two
    # joiners still starting were counted as live.
    cfg = soak.SoakConfig(10, workers=3)  # low mark 2
    rng = random.Random(3)
    drawn = {soak.draw(rng, cfg, 0, live=4, world=2, hosts=3).kind for _ in range(300)}
    assert not drawn & set(soak.REMOVES), drawn
    assert "kill-worker" in drawn


def test_a_fault_only_a_peer_can_find_is_not_aimed_at_a_world_of_one() -> None:
    cfg = soak.SoakConfig(10, workers=2, kinds=("kill-worker", "freeze-worker", "hang-worker"))
    rng = random.Random(5)
    drawn = {soak.draw(rng, cfg, 0, live=2, world=1, hosts=2).kind for _ in range(100)}
    assert drawn == {"kill-worker"}, drawn


def test_the_run_is_long_enough_for_every_fault() -> None:
    cfg = soak.SoakConfig(1200, every_s=3.0, step_time=0.05)
    assert cfg.every_steps == 60
    assert cfg.train.total_steps >= (cfg.faults + 1) * cfg.every_steps + 30 / 0.05
    assert soak.SoakConfig(4).train.total_steps < cfg.train.total_steps


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--faults", "0"], "--faults"),
        (["--faults", "3", "--workers", "1"], "--workers"),
        (["--faults", "3", "--every", "-1"], "--every"),
    ],
)
def test_bad_soak_arguments_are_refused_by_name(capsys, tmp_path, args, named) -> None:
    code, _, err = elastic(capsys, "chaos", "soak", *args, "--report", str(tmp_path / "r"))
    assert code != 0 and named in err
    assert len(err.strip().splitlines()) == 1 or "usage:" in err


@pytest.mark.slow  # about 100 s on two busy cores: the reference and a 720-step soak
def test_a_tiny_soak_fires_every_fault_and_keeps_every_invariant(tmp_path) -> None:
    cfg = soak.SoakConfig(4, seed=3, every_s=1.0, step_time=0.05)
    settings = Settings(timeout_scale=SETTINGS.timeout_scale)
    result, summary = soak.run_soak(cfg, settings, str(tmp_path / "report"))
    problems = [c for c in result.checks + result.expectations if not c.held]
    assert result.passed, (result.error, problems, result.faults, result.run_dir)
    assert summary["faults_fired"] == 4
    assert sum(summary["fired_per_kind"].values()) == 4
    assert [c["name"] for c in summary["invariants"]] == list(INVARIANTS)
    # Every fault but a join breaks a World: the job recovered at least once per such fault.
    breaking = sum(n for k, n in summary["fired_per_kind"].items() if k != "join")
    assert summary["recoveries"]["count"] >= min(1, breaking)
    stored = json.loads((tmp_path / "report" / "soak.json").read_text())
    assert stored["fired_per_kind"] == summary["fired_per_kind"]
    md = (tmp_path / "report" / "soak.md").read_text()
    assert "verdict: PASS" in md and "faults fired: 4 of 4" in md
    # (the autouse hygiene fixture fails the test if any process of the soak survived)
