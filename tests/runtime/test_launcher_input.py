"""`elastic run` refuses bad input with a clear message and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .harness import CLASSIFIER, REPO


def run_cli(*args: str, cwd: str, timeout: float = 60.0) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "elastic.cli", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stderr, time.monotonic() - t0


@pytest.mark.parametrize(
    "args,expected",
    [
        (["-n", "2", "no_such_script.py"], "training script 'no_such_script.py' does not exist"),
        (["-n", "0", CLASSIFIER], "-n/--nproc must be >= 1, got 0"),
        (
            ["--min-workers", "3", "--max-workers", "2", CLASSIFIER],
            "--min-workers/--max-workers: max_workers (2) must be >= min_workers (3)",
        ),
        (["--min-workers", "0", CLASSIFIER], "--min-workers: min_workers must be an integer >= 1"),
        (["--lease-ttl", "0.5", CLASSIFIER], "--lease-ttl: lease_ttl must be >= 1 second"),
        (["--checkpoint-every", "-1", CLASSIFIER], "--checkpoint-every: checkpoint_every must be"),
        (["--resume", CLASSIFIER], "--resume: resume needs a checkpoint location"),
        (["--max-restarts", "-1", CLASSIFIER], "--max-restarts must be >= 0, got -1"),
        (
            ["--no-checkpoint", "--checkpoint", "file:///tmp/x", CLASSIFIER],
            "--no-checkpoint contradicts --checkpoint/--checkpoint-every",
        ),
        (["--job", "bad job!", CLASSIFIER], "--job: invalid job id 'bad job!'"),
        (["--etcd", "localhost:2379", CLASSIFIER], "malformed URL 'localhost:2379'"),
        (["--replicas", "2", CLASSIFIER], "--replicas needs --shard-state"),
        (["--shards", "4", CLASSIFIER], "--shards needs --shard-state"),
        (["--shard-state", "--replicas", "0", CLASSIFIER], "--replicas: replicas must be >= 1"),
        (["--shard-state", "--shards", "99", CLASSIFIER], "--shards: shards must be 1..62"),
        (["--servers", "-1", CLASSIFIER], "--servers must be >= 0, got -1"),
        (
            ["--shard-state", "--replicas", "3", "--max-workers", "2", CLASSIFIER],
            "--replicas 3 is more than --max-workers 2",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, args, expected):
    rc, err, _ = run_cli(*args, cwd=str(tmp_path))
    assert rc != 0
    assert expected in err, err
    assert not os.listdir(tmp_path), "nothing may be started or written on bad input"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_etcd_password_without_a_user_is_refused_by_the_launcher(tmp_path, how):
    # Without the check the launcher dropped the password and every worker,
    # which inherits $ELASTIC_ETCD_PASSWORD, failed to authenticate.
    args = ["--etcd-password", "pw"] if how == "flag" else []
    env = dict(os.environ, ELASTIC_ETCD_PASSWORD="pw") if how == "environment" else None
    proc = subprocess.run(
        [sys.executable, "-m", "elastic.cli", "run", *args, "-n", "1", CLASSIFIER],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0, proc.stderr
    assert "an etcd password is set" in proc.stderr and "--etcd-user" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.listdir(tmp_path)


def test_unreachable_etcd_fails_within_the_stated_bound(tmp_path):
    rc, err, took = run_cli(
        "--etcd", "http://127.0.0.1:9", "--etcd-timeout", "2", CLASSIFIER, cwd=str(tmp_path)
    )
    assert rc != 0
    assert "connecting to http://127.0.0.1:9 failed for 2.0s (bound)" in err, err
    assert took < 30


def test_resume_from_an_empty_location_is_refused(tmp_path):
    rc, err, _ = run_cli(
        "--resume", "--checkpoint", f"file://{tmp_path}/empty", CLASSIFIER, cwd=str(tmp_path)
    )
    assert rc != 0
    assert "no committed checkpoint" in err and "empty" in err, err


def test_fresh_run_on_a_location_with_checkpoints_is_refused(tmp_path):
    import torch

    from storage import CheckpointStore

    url = f"file://{tmp_path}/ck"
    CheckpointStore(url).save(5, {"w": torch.zeros(2)})
    rc, err, _ = run_cli("--checkpoint", url, CLASSIFIER, cwd=str(tmp_path))
    assert rc != 0
    assert "already holds checkpoints (newest step 5)" in err and "--resume" in err, err


def test_script_outside_elastic_run_trains_alone(tmp_path):
    # `python train.py`: a one-worker job on an embedded etcd of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_")}
    proc = subprocess.run(
        [sys.executable, CLASSIFIER, "--max-steps", "3", "--out", str(tmp_path / "f.pt")],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stderr
    assert "training finished at step 3" in proc.stderr + proc.stdout
    assert (tmp_path / "f.pt").exists()


def test_checkpoint_every_without_a_location_on_an_external_etcd_is_refused(tmp_path, etcd_url):
    rc, err, _ = run_cli(
        "--etcd", etcd_url, "--checkpoint-every", "10", CLASSIFIER, cwd=str(tmp_path)
    )
    assert rc != 0
    assert "--checkpoint-every needs a location" in err, err


@pytest.mark.parametrize(
    "make_args,expected",
    [
        (
            lambda d: ["--settle", "-5", CLASSIFIER],
            "argument --settle: must be >= 0 seconds, got -5",
        ),
        (lambda d: ["--hang-factor", "0.5", CLASSIFIER], "argument --hang-factor: must be >= 1"),
        (lambda d: ["--hang-floor", "0", CLASSIFIER], "argument --hang-floor: must be > 0 seconds"),
        (
            lambda d: ["--lease-ttl", "nan", CLASSIFIER],
            "argument --lease-ttl: 'nan' is not a finite",
        ),
        (
            lambda d: ["--ledger-dir", _file(d, "ledger"), CLASSIFIER],
            "exists and is not a directory",
        ),
        (
            lambda d: ["--event-log", _file(d, "f") + "/events.jsonl", CLASSIFIER],
            "cannot create files under",
        ),
        (lambda d: ["--event-log", d, CLASSIFIER], "is a directory; name a file"),
    ],
)
def test_unusable_settings_are_refused_before_any_worker_starts(tmp_path, make_args, expected):
    d = str(tmp_path / "in")
    os.makedirs(d)
    rc, err, _ = run_cli(*make_args(d), cwd=str(tmp_path))
    assert rc != 0
    assert expected in err, err
    assert "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["in"], "nothing may be started on bad input"


def _file(d: str, name: str) -> str:
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write("x")
    return path


def _events(path: str) -> list[dict]:
    from elastic.base.events import read_events

    return read_events(path)


def test_restarts_of_a_script_that_keeps_failing_back_off(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(1)\n")
    log = str(tmp_path / "events.jsonl")
    rc, err, _ = run_cli(
        "--max-restarts",
        "5",
        "--event-log",
        log,
        "--no-checkpoint",
        str(script),
        cwd=str(tmp_path),
        timeout=120,
    )
    assert rc != 0
    events = _events(log)
    delays = [e["seconds"] for e in events if e["event"] == "backoff"]
    assert delays == [0.5, 1.0, 2.0, 4.0], delays
    # Each delayed respawn starts no sooner than its delay after the exit it follows.
    exits = [e["t"] for e in events if e["event"] == "exit"]
    spawns = [e["t"] for e in events if e["event"] == "spawn"]
    assert len(spawns) == 6 and len(exits) == 6
    for delay, gone, again in zip(delays, exits[1:5], spawns[2:], strict=True):
        assert again - gone >= delay - 0.05, (delay, gone, again)


def test_script_that_never_joins_the_job_is_a_clear_failure(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("print('no Trainer here')\n")
    rc, err, _ = run_cli("--no-checkpoint", str(script), cwd=str(tmp_path))
    assert rc != 0
    assert "exited without joining job" in err and "Trainer" in err, err


def test_a_worker_receives_its_settings_as_one_value(tmp_path):
    # The script reads its config the way Trainer does and reports what it got;
    # it then exits without joining, which the launcher reports (not the point).
    script = tmp_path / "show.py"
    script.write_text(
        "import json, os, sys\n"
        "from elastic import RuntimeConfig\n"
        "cfg = RuntimeConfig.from_env()\n"
        "names = sorted(k for k in os.environ if k.startswith('ELASTIC_'))\n"
        "print('SEEN ' + json.dumps([names, cfg.rendezvous.lease_ttl, cfg.hangs.floor_s, "
        "cfg.collective_timeout, cfg.etcd.connect_timeout]), file=sys.stderr)\n"
    )
    rc, err, _ = run_cli(
        "--no-checkpoint",
        "--lease-ttl",
        "3",
        "--hang-floor",
        "4",
        "--collective-timeout",
        "40",
        "--etcd-timeout",
        "7",
        str(script),
        cwd=str(tmp_path),
    )
    seen = [line for line in err.splitlines() if "SEEN " in line]
    assert seen, err
    names, ttl, floor, collective, etcd_timeout = json.loads(seen[0].split("SEEN ", 1)[1])
    assert names == ["ELASTIC_CONFIG"]
    assert (ttl, floor, collective, etcd_timeout) == (3.0, 4.0, 40.0, 7.0)


@pytest.mark.slow  # CI time (13 s)
def test_min_workers_above_the_local_workers_says_what_it_waits_for(tmp_path):
    log = str(tmp_path / "events.jsonl")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "run",
            "-n",
            "1",
            "--min-workers",
            "3",
            "--no-checkpoint",
            "--event-log",
            log,
            CLASSIFIER,
        ],
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        from tests.helpers.wait import wait_until

        found = wait_until(
            lambda: (
                os.path.exists(log)
                and [e for e in _events(log) if e["event"] == "waiting" and e["present"] == 1]
            ),
            60,
            "a 'waiting for 3 workers (1 present)' line",
        )
        assert found[0]["want"] == 3, found
        notes = [e for e in _events(log) if e["event"] == "note"]
        assert notes, "no note at launch about --min-workers"
    finally:
        import signal as _signal

        os.killpg(proc.pid, _signal.SIGKILL)
        proc.wait(timeout=30)


def test_more_replicas_than_the_owners_a_new_job_starts_is_refused(tmp_path):
    rc, err, _ = run_cli(
        "-n", "2", "--shard-state", "--replicas", "3", CLASSIFIER, cwd=str(tmp_path)
    )
    assert rc != 0
    assert "--replicas 3 is more than the 2 worker(s) this launch starts" in err, err


def test_more_replicas_than_servers_is_refused(tmp_path):
    rc, err, _ = run_cli("--servers", "2", "--replicas", "3", CLASSIFIER, cwd=str(tmp_path))
    assert rc != 0
    assert "--replicas 3 is more than the 2 server(s) of --servers" in err, err
