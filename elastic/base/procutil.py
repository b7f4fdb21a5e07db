"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import os
import sys

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
