"""`elastic status` (missing job, a running job watched until it finished) and
`elastic plot` (a PNG with content; a clear line without matplotlib)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from elastic.base.events import read_events
from elastic.coord.keys import Keyspace
from tests.helpers.wait import wait_until

from .launch import CLASSIFIER, _end, _env, run_logged, start

DEMO_LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kill-rejoin.jsonl")


def test_status_of_a_job_that_does_not_exist_fails_clearly(
    etcd_url: str, keys: Keyspace, tmp_path: Any
) -> None:
    rc, out, err = run_logged(
        ["status", "--job", keys.job, "--etcd", etcd_url], tmp_path, timeout=60
    )
    assert rc == 1 and out == ""
    assert err.startswith(f"elastic: error: no job '{keys.job}' in this etcd"), err
    assert "Traceback" not in err


def test_status_watch_follows_a_running_job_until_it_is_shown_finished(
    etcd_url: str, keys: Keyspace, tmp_path: Any
) -> None:
    log = str(tmp_path / "ev.jsonl")
    job = start(
        [
            "run",
            "--job",
            keys.job,
            "--etcd",
            etcd_url,
            "-n",
            "2",
            "--event-log",
            log,
            CLASSIFIER,
            "--max-steps",
            "60",
            "--step-time",
            "0.06",
        ],
        tmp_path,
        quiet=True,
    )
    watch = None
    try:
        wait_until(
            lambda: os.path.exists(log) and any(e["event"] == "step" for e in read_events(log)),
            120,
            "the first step",
        )
        watch = start(
            [
                "status",
                "--job",
                keys.job,
                "--etcd",
                etcd_url,
                "--watch",
                "0.5",
                "--event-log",
                log,
            ],
            tmp_path,
        )
        out, err = watch.communicate(timeout=180)  # it ends by itself when the job finished
        assert job.wait(timeout=120) == 0
    finally:
        for p in (job, watch):
            if p is not None:
                _end(p)
    assert watch.returncode == 0, err
    steps = [int(s) for s in re.findall(r"progress \(from .*?\): step (\d+)/60", out)]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[0] < 60, out[-2000:]
    blocks = out.split("\n-- ")
    assert f"job {keys.job}: finished at step 60" in blocks[-2]
    assert "training finished" in blocks[-2] and "the job finished" in blocks[-1]
    assert "last events:" in out and "generation" in out and "samples/s" in out
    # once finished, the JSON says so too
    rc, text, _ = run_logged(
        ["status", "--job", keys.job, "--etcd", etcd_url, "--json", "--event-log", log],
        tmp_path,
        timeout=60,
    )
    doc = json.loads(text)
    assert rc == 0 and doc["finished_step"] == 60 and doc["progress"]["step"] == 60


def test_plot_draws_world_loss_rate_and_marks_from_an_event_log(tmp_path: Any) -> None:
    image = pytest.importorskip("matplotlib.image")
    png = str(tmp_path / "run.png")
    rc, out, err = run_logged(["plot", DEMO_LOG, "-o", png], tmp_path, timeout=120)
    assert rc == 0, err
    assert "1 failure, 1 join" in out and "4 checkpoint" in out
    pixels = image.imread(png)[..., :3]
    h, w, _ = pixels.shape
    assert (h, w) == (650, 800)
    # each of the three panels (top, middle, bottom thirds) has ink, not just a frame
    for third in range(3):
        panel = pixels[h * third // 3 + 40 : h * (third + 1) // 3 - 30, 90 : w - 20]
        assert (panel.min(axis=2) < 0.6).mean() > 0.005, third
    colours = {tuple((c * 8).astype(int)) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) >= 8  # curves and red/green/blue/purple marks, not one colour


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Any) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; from elastic.cli import main; "
        f"sys.exit(main(['plot', {DEMO_LOG!r}, '-o', 'x.png']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "needs matplotlib" in done.stderr and "[plot]" in done.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_plot_of_a_missing_log_is_one_line(tmp_path: Any) -> None:
    rc, _, err = run_logged(["plot", "nope.jsonl"], tmp_path, timeout=60)
    assert rc == 1 and err == "elastic: error: event log 'nope.jsonl' does not exist\n"


def test_watch_shows_a_finished_job_whose_etcd_stopped_as_finished(
    fresh_etcd: Any, keys: Keyspace, make_client: Any, tmp_path: Any
) -> None:
    client = make_client(fresh_etcd.url)
    client.put(keys.gen, "1")
    log = tmp_path / "ev.jsonl"
    log.write_text(
        "".join(
            json.dumps(e) + "\n"
            for e in [
                {
                    "t": 1.0,
                    "event": "generation",
                    "gen": 1,
                    "world": ["a"],
                    "step": 0,
                    "total_steps": 2,
                    "global_batch": 4,
                },
                {"t": 2.0, "event": "step", "step": 1, "gen": 1, "world": 1, "loss": 0.5},
                {"t": 3.0, "event": "step", "step": 2, "gen": 1, "world": 1, "loss": 0.25},
                {"t": 3.1, "event": "finished", "step": 2, "gen": 1, "loss": 0.25},
            ]
        )
    )
    watch = start(
        [
            "status",
            "--job",
            keys.job,
            "--etcd",
            fresh_etcd.url,
            "--watch",
            "0.2",
            "--etcd-timeout",
            "1",
            "--event-log",
            str(log),
        ],
        tmp_path,
    )
    try:
        assert watch.stdout is not None
        first = [watch.stdout.readline() for _ in range(6)]
        assert any(f"job {keys.job}: generation 1" in ln for ln in first), first
        fresh_etcd.stop()
        out, err = watch.communicate(timeout=120)
    finally:
        _end(watch)
    assert watch.returncode == 0, err
    assert "etcd does not answer any more: the job finished" in out
    assert "step 2/2" in out and "training finished" in out
