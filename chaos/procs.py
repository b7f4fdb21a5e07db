"""Processes of one chaos run, found through /proc (Linux): by run token, by parent
(the /proc reading itself is :mod:`elastic.base.procutil`'s).

Every process the runner starts carries ``CHAOS_RUN_TOKEN=<token>`` in its
environment (``elastic run`` passes its environment on to the workers), so a
pid is only ever signalled after checking that it still belongs to the run:
a dead worker's pid may have been reused by an unrelated process.
"""

from __future__ import annotations

import os

from elastic.base.procutil import alive, all_pids, environ_has, parent

TOKEN_ENV = "CHAOS_RUN_TOKEN"


def belongs(pid: int, token: str) -> bool:
    """``pid`` is a live process started for the run with ``token``."""
    return alive(pid) and environ_has(pid, f"{TOKEN_ENV}={token}".encode())


def processes_with_token(token: str) -> set[int]:
    """Live processes started for one run: they carry its token in their environment."""
    needle = f"{TOKEN_ENV}={token}".encode()
    me = os.getpid()
    return {pid for pid in all_pids() if pid != me and environ_has(pid, needle) and alive(pid)}


def children_with_token(pid: int, token: str) -> set[int]:
    """The run's live processes whose parent is ``pid`` (a launcher's workers)."""
    return {p for p in processes_with_token(token) if parent(p) == pid}
