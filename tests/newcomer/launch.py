"""Run `elastic` as a user would, on a terminal (a pseudo-terminal) or into a log."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ELASTIC = [sys.executable, "-m", "elastic.cli"]
CLASSIFIER = os.path.join(REPO, "examples", "classifier.py")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run_logged(args: list[str], cwd: Any, timeout: float = 180.0) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `elastic ARGS` with both piped (not a terminal)."""
    proc = subprocess.Popen(
        [*ELASTIC, *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _end(proc)
    return proc.returncode, out, err


def run_on_terminal(args: list[str], cwd: Any, timeout: float = 180.0) -> tuple[int, str]:
    """Exit code and everything `elastic ARGS` wrote to its terminal (a pty)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*ELASTIC, *args],
        cwd=cwd,
        env=_env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        start_new_session=True,
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(leader)
        _end(proc)
    return proc.returncode, b"".join(chunks).decode(errors="replace")
