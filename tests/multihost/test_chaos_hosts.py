"""`elastic chaos run --hosts 3`: scenarios on a test bed of hosts, driven as a user does.

The command builds the bed itself (three hosts and a control host), runs the
suite inside it and removes it; the test checks the verdicts, that each fault
acted on what it names (a host's link, the etcd leader), and that the bed is
gone afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chaos import netbed
from tests.runtime.harness import REPO


def _bed_names(owner: int) -> list[str]:
    prefix = f"{netbed.PREFIX}{owner}"
    return [n for n in netbed._netns_names() + netbed._link_names() if n.startswith(prefix)]


# Over five minutes on CI's two cores: the slow suite's (`-m slow`); the fast
# suite covers a pulled link in tests/multihost/test_host_failures.py.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_link_down_and_etcd_leader_loss_on_three_hosts_keep_every_invariant(
    bed_available: None, tmp_path
) -> None:
    report = tmp_path / "report"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "chaos",
            "run",
            "--hosts",
            "3",
            "--scenario",
            "link-down",
            "--scenario",
            "etcd-leader-loss",
            "--report",
            str(report),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()  # its bed is removed by the next bed (its owner is dead)
            proc.wait(timeout=30)
    assert proc.returncode == 0, out[-6000:]
    assert "test bed: 3 hosts" in out
    assert not _bed_names(proc.pid), "the bed outlived the command"
    doc = json.loads((report / "report.json").read_text())
    runs = {r["scenario"]: r for r in doc["runs"]}
    assert set(runs) == {"link-down", "etcd-leader-loss"}
    for r in runs.values():
        assert r["passed"], r
        assert all(f["fired"] for f in r["faults"]), r["faults"]
    (cut,) = runs["link-down"]["faults"]
    assert cut["address"].startswith("10.213.8.") and cut["evicted"], cut
    (lost,) = runs["etcd-leader-loss"]["faults"]
    assert lost["leader"].startswith("http://10.213.8."), lost  # on the control host
