"""Per-test hygiene for the runtime's tests: no process, thread or thread error left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import procs

# Threads the elastic package starts (sessions, mirrors, watch streams, campaigns)
# and the simulated members of tests/helpers/sim.py.
_OURS = ("lease-", "mirror", "watch", "campaign-", "sim-")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # An exception that kills a background thread fails the test that caused it.
    here = str(__file__).rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(
                pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
            )


@pytest.fixture(autouse=True)
def no_leftover_processes(tmp_path: Any) -> Iterator[None]:
    """Fail a test that leaves a child process (or anything using its tmp dir) running.

    Autouse, so it is set up before and torn down after the test's own
    fixtures: their cleanup has run when this looks.
    """
    before = procs.children()
    yield
    left = (procs.children() - before) | procs.mentioning(str(tmp_path))
    left = {p for p in left if "multiprocessing" not in procs.cmdline(p)}
    if left:
        described = {p: procs.cmdline(p) for p in left}
        procs.end(left)
        pytest.fail(f"test left processes running (now ended): {described}")


@pytest.fixture(autouse=True)
def no_leftover_threads(make_client: Any) -> Iterator[None]:
    """Fail a test after which a session, mirror or member thread it started still runs.

    Depends on ``make_client`` so that it looks before the clients are closed:
    closing a client ends every thread using it and would hide the leak.
    """
    before = set(threading.enumerate())

    def leftover() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith(_OURS)
        ]

    yield
    deadline = time.monotonic() + 1.5  # closed threads notice within their poll interval (<= 0.5 s)
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.05)
    names = sorted(t.name for t in leftover())
    if names:
        pytest.fail(f"test left threads running: {names}")
