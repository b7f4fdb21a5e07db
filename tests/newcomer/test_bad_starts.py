"""Bad starts end in one line naming the cause and what to do, a non-zero exit and
no restart loop (spawns counted in the event log). Real launcher, workers, etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from elastic.base.events import read_events
from elastic.coord.etcd import EmbeddedEtcd
from elastic.coord.keys import Keyspace
from tests.helpers.wait import wait_until

from .launch import CLASSIFIER, REPO, _end, _env, run_logged, start

TORCHRUN = os.path.join(REPO, "examples", "torchrun_ddp.py")


def _spawns(path: str) -> int:
    return sum(e["event"] == "spawn" for e in read_events(path)) if os.path.exists(path) else 0


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("elastic: error:")]


def test_a_torchrun_script_without_compat_is_refused_before_any_worker_starts(
    tmp_path: Any,
) -> None:
    rc, _, err = run_logged(
        ["run", "-n", "2", "--event-log", "ev.jsonl", TORCHRUN], tmp_path, timeout=60
    )
    assert rc != 0
    assert "Traceback" not in err and "RANK expected" not in err
    (line,) = _errors(err)
    assert "re-run with --torchrun-compat" in line and "torchrun_ddp.py" in line
    assert _spawns(str(tmp_path / "ev.jsonl")) == 0


def test_the_same_script_still_runs_with_compat(tmp_path: Any) -> None:
    rc, out, err = run_logged(
        ["run", "--torchrun-compat", "-n", "2", "--event-log", "ev.jsonl", TORCHRUN], tmp_path
    )
    assert rc == 0, err[-2000:]
    assert "world 2, restart 0" in out


def test_a_script_run_without_the_launcher_trains_alone(tmp_path: Any) -> None:
    env = {k: v for k, v in _env().items() if not k.startswith("ELASTIC_")}
    done = subprocess.run(
        [sys.executable, CLASSIFIER, "--max-steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "training finished at step 2" in done.stderr + done.stdout


BAD_CONFIG = """
import torch
from torch.utils.data import TensorDataset
from elastic import Trainer
model = torch.nn.Linear(2, 1)
Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorDataset(torch.zeros(8, 2)),
        loss_fn=lambda m, b: m(b[0]).sum(), global_batch_size=4, grad_shards=9).fit()
"""


def test_a_bad_setting_in_every_worker_is_said_once_and_not_restarted(tmp_path: Any) -> None:
    script = tmp_path / "bad.py"
    script.write_text(BAD_CONFIG)
    rc, _, err = run_logged(
        ["run", "-n", "2", "--no-checkpoint", "--event-log", "ev.jsonl", str(script)], tmp_path
    )
    assert rc != 0
    assert "Traceback" not in err
    (line,) = _errors(err)  # two workers, one line
    assert "grad_shards" in line and "9" in line
    assert _spawns(str(tmp_path / "ev.jsonl")) == 2  # the two first starts, no restart
    gave_up = [e for e in read_events(str(tmp_path / "ev.jsonl")) if e["event"] == "give_up"]
    assert len(gave_up) == 2


@pytest.mark.slow  # CI time (24 s)
def test_a_joining_worker_whose_etcd_vanished_is_not_restarted(
    fresh_etcd: EmbeddedEtcd, keys: Keyspace, make_client: Any, tmp_path: Any
) -> None:
    client = make_client(fresh_etcd.url)
    # A running job that needs two workers: the joiner waits for a partner.
    client.put(keys.gen, "1")
    client.put(keys.ctl + "config", json.dumps({"min_workers": 2, "max_workers": 4}))
    log = str(tmp_path / "ev.jsonl")
    proc = start(
        [
            "run",
            "--job",
            keys.job,
            "--etcd",
            fresh_etcd.url,
            "-n",
            "1",
            "--etcd-timeout",
            "2",
            "--lease-ttl",
            "2",
            "--etcd-outage",
            "5",
            "--event-log",
            log,
            CLASSIFIER,
        ],
        tmp_path,
    )
    try:
        wait_until(
            lambda: client.get_prefix(keys.members) and list(client.get_prefix(keys.members)),
            90,
            "the joiner registered",
        )
        fresh_etcd.stop()  # the job's first launcher finished and took its etcd along
        out, err = proc.communicate(timeout=120)
    finally:
        _end(proc)
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    (line,) = _errors(err)
    assert "etcd" in line and "still running" in line
    assert "does not answer: not restarting worker" in err
    assert _spawns(log) == 1


def test_a_torchrun_init_the_scan_cannot_see_fails_once_per_worker_without_restarts(
    tmp_path: Any,
) -> None:
    (tmp_path / "helper.py").write_text(
        "import torch.distributed as dist\n\n\ndef setup():\n    dist.init_process_group('gloo')\n"
    )
    (tmp_path / "main.py").write_text("import helper\n\nhelper.setup()\n")
    rc, _, err = run_logged(
        ["run", "-n", "2", "--no-checkpoint", "--event-log", "ev.jsonl", str(tmp_path / "main.py")],
        tmp_path,
    )
    assert rc != 0
    advice = [ln for ln in err.splitlines() if "re-run with --torchrun-compat" in ln]
    assert len(advice) == 2, err[-3000:]  # one per worker, naming what to do
    assert _spawns(str(tmp_path / "ev.jsonl")) == 2  # no restart loop
