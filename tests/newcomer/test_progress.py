"""The progress line and the summary: their content from events (unit), and the
view following a real log file that another writer appends to."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from elastic.base.errors import ConfigError
from elastic.base.events import LogFollower
from elastic.launch.progress import (
    ProgressConfig,
    ProgressView,
    RunStats,
    format_line,
    format_summary,
)
from tests.helpers.wait import wait_until


def _events(total: int = 100, steps: int = 40) -> list[dict[str, Any]]:
    evs: list[dict[str, Any]] = [
        {"t": 0.0, "event": "spawn"},
        {"t": 0.0, "event": "spawn"},
        {
            "t": 1.0,
            "event": "generation",
            "gen": 1,
            "world": ["a", "b"],
            "step": 0,
            "total_steps": total,
            "global_batch": 64,
        },
    ]
    evs += [
        {"t": 1.0 + 0.1 * s, "event": "step", "step": s, "gen": 1, "world": 2, "loss": 1.0 / s}
        for s in range(1, steps + 1)
    ]
    return evs


def test_line_shows_step_total_loss_samples_per_s_world_and_eta() -> None:
    st = RunStats()
    for ev in _events():
        st.apply(ev)
    line = format_line(st)
    # 10 steps/s (0.1 s apart) of 64 samples; 60 steps left at 10 steps/s.
    assert line.startswith("step 40/100 (40%)")
    assert "loss 0.025" in line and "640 samples/s" in line
    assert "world 2" in line and "ETA 0:06" in line


def test_line_before_the_rate_is_known_says_so() -> None:
    st = RunStats()
    for ev in _events(steps=1):
        st.apply(ev)
    assert "samples/s -" in format_line(st) and "ETA -" in format_line(st)


def test_summary_counts_failures_once_per_generation_restarts_and_checkpoints() -> None:
    st = RunStats()
    evs = _events() + [
        # two survivors report the same broken generation: one failure
        {"t": 6.0, "event": "failure", "gen": 1, "rank": 0},
        {"t": 6.0, "event": "failure", "gen": 1, "rank": 1},
        {"t": 6.1, "event": "spawn"},
        {"t": 6.2, "event": "recovered", "seconds": 0.2},
        {"t": 7.0, "event": "checkpoint", "step": 50, "final": False},  # started only
        {"t": 7.1, "event": "checkpoint_committed", "step": 50},
        {"t": 8.0, "event": "checkpoint", "step": 100, "final": True},
        {"t": 8.1, "event": "finished", "step": 100, "loss": 0.01},
    ]
    for ev in evs:
        st.apply(ev)
    summary = format_summary(st, 0, 12.34, nproc=2)
    assert summary == (
        "finished: 100/100 steps, final loss 0.01, wall 12.3s, world 2; "
        "1 failure, 1 recovery (slowest 0.20s), 1 restart; "
        "2 checkpoints (last step 100)"
    )


def test_summary_of_a_failed_run_says_failed() -> None:
    st = RunStats()
    for ev in _events():
        st.apply(ev)
    assert format_summary(st, 1, 3.0, nproc=2).startswith("failed: 40/100 steps")


def test_follower_returns_only_complete_lines_and_skips_torn_ones(tmp_path: Any) -> None:
    path = str(tmp_path / "e.jsonl")
    with open(path, "w") as f:
        f.write('{"event": "old"}\n')
    tail = LogFollower(path, from_end=True)  # an earlier run's events are not ours
    assert tail.poll() == []
    with open(path, "a") as f:
        f.write('{"event": "a"}\n{"torn\n{"event": "b"')
    assert [e["event"] for e in tail.poll()] == ["a"]
    with open(path, "a") as f:
        f.write(', "x": 1}\n')
    assert tail.poll() == [{"event": "b", "x": 1}]


def test_progress_config_refuses_a_bad_interval() -> None:
    with pytest.raises(ConfigError, match="-1"):
        ProgressConfig(interval_s=-1)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_view_on_a_terminal_redraws_in_place_and_clears_before_other_lines(tmp_path: Any) -> None:
    path = str(tmp_path / "e.jsonl")
    open(path, "w").close()
    out = _Tty()
    view = ProgressView(path, nproc=2, stream=out, config=ProgressConfig(refresh_s=0.02))
    try:
        with open(path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in _events())
        wait_until(lambda: "step 40/100" in out.getvalue(), 20, "the progress line")
        view.write("[elastic] a worker line\n")
        summary = view.finish(0)
    finally:
        view.close()
    text = out.getvalue()
    assert "\r\x1b[Kstep 40/100 (40%)" in text
    # the other line starts on a cleared line, and the progress line comes back after it
    assert "\r\x1b[K[elastic] a worker line\nstep 40/100" in text
    assert text.endswith(f"\r\x1b[K[elastic] summary: {summary}\n")
    assert text.count("summary:") == 1 and "\n" not in text[: text.index("[elastic] a")]


def test_view_in_a_log_writes_plain_lines_without_carriage_returns(tmp_path: Any) -> None:
    path = str(tmp_path / "e.jsonl")
    out = io.StringIO()  # not a terminal
    view = ProgressView(
        path, nproc=2, stream=out, config=ProgressConfig(refresh_s=0.02, interval_s=0.05)
    )
    try:
        with open(path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in _events())
        wait_until(
            lambda: "[elastic] progress: step 40/100" in out.getvalue(), 20, "a plain progress line"
        )
        view.finish(0)
    finally:
        view.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.count("[elastic] progress: step 40/100") == 1  # no repeat without a new step
    assert text.count("[elastic] summary: ") == 1


def test_forwarded_error_lines_of_several_workers_are_said_once(tmp_path: Any) -> None:
    import subprocess
    import sys

    out = io.StringIO()
    view = ProgressView(str(tmp_path / "e.jsonl"), nproc=2, stream=out)
    code = "import sys; sys.stderr.write('elastic: error: bad x\\n'); print('hello')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        captured_err, captured_out = io.StringIO(), io.StringIO()
        real = sys.stderr, sys.stdout
        sys.stderr, sys.stdout = captured_err, captured_out
        try:
            for p in procs:
                view.forward(p)
            for p in procs:
                p.wait(timeout=30)
            view.close()
        finally:
            sys.stderr, sys.stdout = real
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert captured_err.getvalue() == "elastic: error: bad x\n"
    assert captured_out.getvalue() == "hello\nhello\n"


def test_malformed_records_are_skipped_not_fatal() -> None:
    st = RunStats()
    for ev in [{"event": "step", "step": "x"}, {"event": "step"}, [], *_events()]:
        st.apply(ev)  # type: ignore[arg-type]
    assert format_line(st).startswith("step 40/100")
