"""Process hygiene: find what a test left running and end it, by pid only."""

from __future__ import annotations

import os
import signal
import time

# The /proc reading is the product's; tests use it through this module.
from elastic.base.procutil import alive, all_pids, children, cmdline, reap, send_signal

__all__ = ["alive", "children", "cmdline", "end", "mentioning"]


def mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (e.g. a test's tmp dir)."""
    me = os.getpid()
    return {pid for pid in all_pids() if pid != me and text in cmdline(pid) and alive(pid)}


def end(pids: set[int], grace: float = 3.0) -> None:
    """SIGCONT + SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            send_signal(pid, sig)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        reap(pids)
        time.sleep(0.02)
    for pid in pids:
        if alive(pid):
            send_signal(pid, signal.SIGKILL)
    reap(pids)
