"""Processes of one chaos run, found through /proc (Linux): by run token, by parent.

Every process the runner starts carries ``CHAOS_RUN_TOKEN=<token>`` in its
environment (``elastic run`` passes its environment on to the workers), so a
pid is only ever signalled after checking that it still belongs to the run:
a dead worker's pid may have been reused by an unrelated process.
"""

from __future__ import annotations

import os

TOKEN_ENV = "CHAOS_RUN_TOKEN"


def environ_has(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:
        return False


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    return stat[stat.rfind(b")") + 2:].split()


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def belongs(pid: int, token: str) -> bool:
    """``pid`` is a live process started for the run with ``token``."""
    return alive(pid) and environ_has(pid, f"{TOKEN_ENV}={token}".encode())


def processes_with_token(token: str) -> set[int]:
    """Live processes started for one run: they carry its token in their environment."""
    needle = f"{TOKEN_ENV}={token}".encode()
    me = os.getpid()
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me and environ_has(int(name), needle):
            if alive(int(name)):
                found.add(int(name))
    return found


def children_with_token(pid: int, token: str) -> set[int]:
    """The run's live processes whose parent is ``pid`` (a launcher's workers)."""
    return {p for p in processes_with_token(token) if parent(p) == pid}


def send_signal(pid: int, sig: int) -> bool:
    """Signal ``pid``; False when it is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def reap(pids: set[int]) -> None:
    """Collect those of ``pids`` that are our exited children (no zombies left)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child, or already reaped
