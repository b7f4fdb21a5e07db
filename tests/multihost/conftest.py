"""Fixtures for multi-host tests: test beds of network namespaces, a one-host reference.

Every namespace, device and process is removed at teardown, pass or fail.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from chaos import netbed as netns
from chaos.netbed import TestBed

from .bed import LINEAR, TRAIN_ARGS


@pytest.fixture(scope="session")
def bed_available() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def make_bed(bed_available: None) -> Iterator[Callable[[int], TestBed]]:
    """Build test beds of n hosts; each is destroyed at teardown."""
    beds: list[TestBed] = []

    def make(n: int) -> TestBed:
        beds.append(TestBed(n))
        return beds[-1].create()

    yield make
    for bed in beds:
        bed.destroy()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Final parameters of the same training on one host (two workers, embedded etcd)."""
    tmp = tmp_path_factory.mktemp("mh-reference")
    out = str(tmp / "final.pt")
    # On timeout run() kills the launcher; its workers and etcd die with it.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic.cli",
            "run",
            "-n",
            "2",
            "--no-checkpoint",
            "--event-log",
            str(tmp / "events.jsonl"),
            LINEAR,
            *TRAIN_ARGS,
            "--out",
            out,
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture
def job_id() -> str:
    return f"mh{uuid.uuid4().hex[:8]}"
