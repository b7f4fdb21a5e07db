"""A real `elastic run` (embedded etcd, real workers): one live progress line and one
summary, on a terminal and in a log; no per-worker result line."""

from __future__ import annotations

from typing import Any

from elastic.base.events import read_events

from .launch import CLASSIFIER, run_logged, run_on_terminal

TRAIN = ["--max-steps", "48", "--step-time", "0.04"]


def test_on_a_terminal_the_progress_line_is_redrawn_in_place_then_one_summary(
    tmp_path: Any,
) -> None:
    rc, out = run_on_terminal(
        ["run", "-n", "2", "--no-checkpoint", "--event-log", "events.jsonl", CLASSIFIER, *TRAIN],
        tmp_path,
    )
    assert rc == 0, out[-3000:]
    draws = [d for d in out.split("\r\x1b[K") if d.startswith("step ")]
    assert len(draws) >= 2, out[-3000:]  # redrawn as steps advance, never a new line each
    first = draws[0]
    for field in ("/48 (", "loss ", "samples/s", "world 2", "ETA "):
        assert field in first, (field, first)
    assert not any("\n" in d.split("\r")[0] for d in draws if not d.endswith("\n"))
    lines = [ln for ln in out.replace("\r\n", "\n").split("\n") if "summary:" in ln]
    assert len(lines) == 1, out[-3000:]
    assert "finished: 48/48 steps, final loss" in lines[0] and "wall " in lines[0]
    assert "0 failures" in lines[0]
    assert '"outcome"' not in out  # the per-worker result line is gone
    assert "[elastic] training finished at step 48" in out


def test_in_a_log_plain_progress_lines_then_one_summary(tmp_path: Any) -> None:
    rc, out, err = run_logged(
        [
            "run",
            "-n",
            "2",
            "--no-checkpoint",
            "--progress-every",
            "0.3",
            "--event-log",
            "events.jsonl",
            CLASSIFIER,
            *TRAIN,
        ],
        tmp_path,
    )
    assert rc == 0, err[-3000:]
    assert "\r" not in err and "\x1b" not in err
    progress = [ln for ln in err.splitlines() if ln.startswith("[elastic] progress: step ")]
    assert progress, err[-3000:]
    assert all("/48 (" in ln and "world 2" in ln for ln in progress)
    summaries = [ln for ln in err.splitlines() if "summary:" in ln]
    assert len(summaries) == 1 and "finished: 48/48 steps" in summaries[0]
    assert out.strip() == ""  # no result line per worker on stdout
    steps = [e for e in read_events(str(tmp_path / "events.jsonl")) if e["event"] == "step"]
    assert steps[-1]["step"] == 48
    gens = [e for e in read_events(str(tmp_path / "events.jsonl")) if e["event"] == "generation"]
    assert gens[0]["total_steps"] == 48 and gens[0]["global_batch"] == 64
