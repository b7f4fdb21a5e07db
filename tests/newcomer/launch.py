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


def start(
    args: list[str], cwd: Any, *, quiet: bool = False, terminal: int | None = None
) -> subprocess.Popen:
    """`elastic ARGS` started in a session of its own (end it with `_end`): on
    `terminal` (a pty's follower end) when given, else with stdout and stderr piped
    as text, or discarded when `quiet`."""
    streams: dict[str, Any]
    if terminal is not None:
        streams = {"stdin": terminal, "stdout": terminal, "stderr": terminal}
    else:
        output = subprocess.DEVNULL if quiet else subprocess.PIPE
        streams = {"stdout": output, "stderr": output, "text": True}
    return subprocess.Popen(
        [*ELASTIC, *args], cwd=cwd, env=_env(), start_new_session=True, **streams
    )


def run_logged(args: list[str], cwd: Any, timeout: float = 180.0) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `elastic ARGS` with both piped (not a terminal)."""
    proc = start(args, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _end(proc)
    return proc.returncode, out, err


def run_on_terminal(args: list[str], cwd: Any, timeout: float = 180.0) -> tuple[int, str]:
    """Exit code and everything `elastic ARGS` wrote to its terminal (a pty)."""
    leader, follower = pty.openpty()
    proc = start(args, cwd, terminal=follower)
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
