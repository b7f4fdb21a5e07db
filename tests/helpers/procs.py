"""Process hygiene: find what a test left running and end it, by pid only."""

from __future__ import annotations

import os
import signal
import time

from chaos.procs import reap


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state_and_ppid(pid: int) -> tuple[str, int] | None:
    raw = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not raw:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[1])


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    info = _state_and_ppid(pid)
    return info is not None and info[0] != "Z"


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def children(parent: int | None = None) -> set[int]:
    """Live (non-zombie) direct children of ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for pid in _pids():
        info = _state_and_ppid(pid)
        if info is not None and info[1] == parent and info[0] != "Z":
            found.add(pid)
    return found


def mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (e.g. a test's tmp dir)."""
    me = os.getpid()
    return {pid for pid in _pids() if pid != me and text in cmdline(pid) and alive(pid)}


def end(pids: set[int], grace: float = 3.0) -> None:
    """SIGCONT + SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        reap(pids)
        time.sleep(0.02)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reap(pids)
