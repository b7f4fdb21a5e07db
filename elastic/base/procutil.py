"""Processes: children that do not outlive the process that started them, and
what Linux's /proc tells of a pid (alive, parent, environment, command line).

The one place these are spelled: the chaos runner, the tests and the benchmarks
find, signal and reap processes with them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable

# Run by a fresh interpreter that then execs the real command: it asks the
# kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), checks the
# parent did not die already, and execs. Not a subprocess preexec_fn: forking a
# process that has gRPC threads and running Python in the child before exec can
# abort the child (seen: SIGABRT right after fork).
_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that it gets SIGKILL when this process dies (Linux).

    A launcher killed with SIGKILL cannot clean up, so the kernel must. The
    signal follows the *thread* that spawned the child: spawn from a thread
    that lives as long as the child should. ``cmd[0]`` must be a path.
    Elsewhere than Linux the command is returned unchanged.
    """
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _WRAPPER, str(os.getpid()), *cmd]


def all_pids() -> list[int]:
    """Every process id in /proc (Linux)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    return stat[stat.rfind(b")") + 2 :].split()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def _live_children() -> dict[int, set[int]]:
    """Parent pid -> its live (non-zombie) children, from one scan of /proc."""
    below: dict[int, set[int]] = {}
    for pid in all_pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != b"Z":
            below.setdefault(int(fields[1]), set()).add(pid)
    return below


def children(of: int | None = None) -> set[int]:
    """Live (non-zombie) direct children of ``of`` (default: this process)."""
    return _live_children().get(os.getpid() if of is None else of, set())


def descendants(root: int) -> set[int]:
    """Live processes below ``root``: its children, theirs, and so on."""
    below = _live_children()
    found: set[int] = set()
    todo = [root]
    while todo:
        for pid in below.get(todo.pop(), ()):
            if pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def environ_has(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` (``b"NAME=value"``) is one entry of the environment of ``pid``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def send_signal(pid: int, sig: int) -> bool:
    """Signal ``pid``; False when it is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL every one of ``pids`` that is still there."""
    for pid in pids:
        send_signal(pid, signal.SIGKILL)


def reap(pids: set[int]) -> None:
    """Collect those of ``pids`` that are our exited children (no zombies left)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child, or already reaped
