"""`elastic run --host`: an address this machine does not have is refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

from .harness import CLASSIFIER, REPO


def test_host_not_of_this_machine_is_refused_before_etcd_or_workers_start(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "run",
            "--host",
            "203.0.113.77",
            "-n",
            "1",
            CLASSIFIER,
        ],
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(
        "elastic: error: --host 203.0.113.77 is not an address of this machine; its addresses: "
    ), done.stderr
    assert "127.0.0.1 (" in done.stderr, done.stderr
    assert not os.listdir(tmp_path), "nothing may be started or written on bad input"
