"""Fixtures for multi-host tests: test beds of network namespaces, a one-host reference.

Every namespace, device and process is removed at teardown, pass or fail.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import netns
from tests.helpers.netns import TestBed
from tests.runtime.harness import Job

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
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Final parameters of the same training on one host (two workers, embedded etcd)."""
    job = Job(tmp_path_factory.mktemp("mh-reference"), nproc=2, script=LINEAR,
              script_args=TRAIN_ARGS)
    try:
        assert job.wait(180) == 0, job.log_tail()
        yield job.out
    finally:
        job.close()


@pytest.fixture
def job_id() -> str:
    return f"mh{uuid.uuid4().hex[:8]}"
