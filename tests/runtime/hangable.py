"""examples/classifier.py whose training thread a test can hang or slow down.

SIGUSR1 hangs the main thread in a handler that never returns, while the
process's other threads (the lease keepalive among them) go on: a deadlock or
an endless loop in the step, as the membership sees it. SIGUSR2 makes every
later step of this rank 0.5 s slower: a slow rank that still progresses.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")
sys.path.insert(0, EXAMPLES)
import common  # noqa: E402  (the classifier imports slow_down from it by name)

_never = threading.Event()
_slow = threading.Event()
_slow_down = common.slow_down


def _hang(_signum: int, _frame: object) -> None:
    _never.wait()  # no timeout: this is the hang under test; the test kills the process


def _slower(seconds: float) -> None:
    _slow_down(seconds + (0.5 if _slow.is_set() else 0.0))


common.slow_down = _slower
signal.signal(signal.SIGUSR1, _hang)
signal.signal(signal.SIGUSR2, lambda *_: _slow.set())
runpy.run_path(os.path.join(EXAMPLES, "classifier.py"), run_name="__main__")
