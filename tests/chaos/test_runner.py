"""Runner plumbing: a run that cannot start is reported, children die with the runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from chaos import invariants as inv
from chaos import scenarios as sc
from chaos.run import RunPlan, Settings, processes_with_token, run_one
from elastic.base.procutil import dying_with_parent
from tests.helpers import procs


def test_a_run_that_cannot_start_is_reported_as_an_error_not_raised(tmp_path) -> None:
    scenario = sc.get("kill-worker")
    plan = RunPlan(scenario.name, 0, scenario, scenario.schedule(0))
    result = run_one(
        plan, Settings(etcd_binary=str(tmp_path / "no-etcd")), str(tmp_path / "run"), None
    )
    assert result.error is not None and "no-etcd" in result.error
    assert not result.passed
    assert [c.name for c in result.checks] == list(inv.INVARIANTS)
    assert not any(c.held for c in result.checks)


def test_a_launched_process_dies_with_the_runner(tmp_path) -> None:
    # A stand-in runner starts a long sleep the way the runner starts launchers, then
    # is SIGKILLed: the kernel must take the sleep with it.
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "from elastic.base.procutil import dying_with_parent\n"
        f"p = subprocess.Popen(dying_with_parent(['/bin/sleep', '60']))\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "stand-in runner did not start its child"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        while "sleep" not in procs.cmdline(child):  # exec'd from the wrapper
            assert time.monotonic() < deadline, procs.cmdline(child)
            time.sleep(0.05)
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        while procs.alive(child):
            assert time.monotonic() < deadline, "child outlived its runner"
            time.sleep(0.05)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)


def test_processes_are_found_by_their_run_token(tmp_path) -> None:
    env = dict(os.environ, CHAOS_RUN_TOKEN="tok-123")
    p = subprocess.Popen(dying_with_parent(["/bin/sleep", "30"]), env=env)
    try:
        deadline = time.monotonic() + 10
        while p.pid not in processes_with_token("tok-123"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert p.pid not in processes_with_token("tok-other")
    finally:
        p.kill()
        p.wait(10)
