"""The report: JSON, a Markdown table row per (scenario, seed), a timeline per scenario."""

from __future__ import annotations

import json
import sys

from chaos import invariants as inv
from chaos import report
from chaos import scenarios as sc
from chaos.run import EventTail, Reference, RunResult


def _result(name: str, seed: int, *, broken: tuple[str, ...] = ()) -> RunResult:
    checks = [inv.Check(n, n not in broken, f"{n} detail") for n in inv.INVARIANTS]
    steps = [
        {"seg": 0, "t": float(i), "step": i, "loss": 1.0 / i, "world": 3 if i < 5 else 2, "gen": 1}
        for i in range(1, 11)
    ]
    return RunResult(
        name=name,
        seed=seed,
        breaks=(),
        schedule=["kill-worker rank 1 at step 5"],
        schedule_json={"faults": [], "storage": [{"action": "fail"}, {"action": "fail"}]},
        faults=[
            {"kind": "kill-worker", "fired": True, "t": 5.0, "step": 5},
            {"kind": "kill-worker", "fired": False, "t": 6.0},
        ],
        checks=checks,
        expectations=[inv.Check(sc.EXPECT_FAULTS_FIRED, True, "ok")],
        recovery_s=[0.25, 1.5],
        steps_redone=2,
        wall_s=30.0,
        bound_s=120.0,
        exit_codes=[0],
        run_dir=f"/runs/{name}-s{seed}",
        timeline={
            "t0": 0.0,
            "steps": steps,
            "faults": [{"t": 5.0, "step": 5, "seg": 0, "kind": "kill-worker", "fired": True}],
        },
        config_key="cfg",
    )


def _reference() -> Reference:
    ref = _result("reference", 0)
    return Reference(sc.TrainConfig(), {}, {i: 1.0 / i for i in range(1, 11)}, ref)


def test_markdown_table_has_a_row_per_run_with_faults_recovery_and_held(tmp_path) -> None:
    results = [_result("kill-worker", 0), _result("kill-worker", 1, broken=(inv.FENCING,))]
    doc = report.write(
        str(tmp_path), results, {"cfg": _reference()}, command="elastic x", started=0.0
    )
    md = (tmp_path / "report.md").read_text()
    assert (
        "| kill-worker | 0 | kill-worker, storage fail x2 (1 not fired) | 1.50 (2x) | 2 | "
        "5/5 | ok | - | PASS |"
    ) in md
    assert "| kill-worker | 1 |" in md and "4/5 (broken: fencing) | ok | - | FAIL |" in md
    assert "`fencing`: fencing detail" in md  # the failure is explained below the table
    assert doc["summary"]["failed"] == 1 and not doc["summary"]["all_invariants_held"]
    stored = json.loads((tmp_path / "report.json").read_text())
    assert [r["seed"] for r in stored["runs"]] == [0, 1]
    assert stored["runs"][1]["invariants"][3] == {
        "name": "fencing",
        "held": False,
        "detail": "fencing detail",
    }
    png = tmp_path / "timeline-kill-worker.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_pictures_are_skipped_with_a_note(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    doc = report.write(str(tmp_path), [_result("kill-worker", 0)], {}, command="x", started=0.0)
    assert doc["timelines"] == {}
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_event_tail_reads_only_complete_lines(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(str(path))
    assert tail.poll() == []  # not created yet
    with open(path, "wb") as f:
        f.write(b'{"event": "step", "step": 1}\n{"event": "st')
        f.flush()
        assert [e["step"] for e in tail.poll()] == [1]
        f.write(b'ep", "step": 2}\n')
        f.flush()
        assert [e["step"] for e in tail.poll()] == [2]
        f.write(b"garbage\n")
    assert tail.poll() == [] and len(tail.of("step")) == 2


def test_run_result_json_names_every_invariant() -> None:
    data = _result("kill-worker", 0).to_json()
    assert [c["name"] for c in data["invariants"]] == list(inv.INVARIANTS)
    assert data["passed"] and data["recovery_s"] == [0.25, 1.5]


def test_warnings_are_counted_in_the_table_and_listed_without_failing_the_run(tmp_path) -> None:
    r = _result("kill-worker", 0)
    r.warnings = ["worker w-2 exited with -6 without being targeted (segment 0)"]
    doc = report.write(str(tmp_path), [r], {}, command="x", started=0.0)
    md = (tmp_path / "report.md").read_text()
    assert "| 5/5 | ok | 1 | PASS |" in md
    assert "## Warnings (no invariant broken)" in md and "w-2 exited with -6" in md
    assert doc["summary"]["failed"] == 0
