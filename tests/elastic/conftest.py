"""Per-test process hygiene for the runtime's tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import procs


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
