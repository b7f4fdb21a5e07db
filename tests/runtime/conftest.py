"""Fixtures for runtime integration tests: a failure-free reference run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import Job


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Final parameters of a failure-free run (same seed, same global batch)."""
    tmp = tmp_path_factory.mktemp("reference")
    job = Job(tmp, nproc=2)
    try:
        assert job.wait(180) == 0, job.log_tail()
        yield job.out
    finally:
        job.close()


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    """Jobs a test starts; all of their processes are ended at teardown."""
    started: list[Job] = []
    yield started
    for job in started:
        job.close()
