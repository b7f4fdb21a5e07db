import pytest

import elastic
from tests.loop.reference import run_alone
from tests.runtime.conftest import jobs  # noqa: F401  (every job's processes ended at teardown)


@pytest.fixture(scope="session")
def alone(tmp_path_factory) -> tuple[str, str]:
    """examples/own_loop.py run alone: (final state, metrics log)."""
    return run_alone(str(tmp_path_factory.mktemp("alone")))


@pytest.fixture
def job(monkeypatch):
    """A one-worker job on its own embedded etcd (a script run without the launcher)."""
    monkeypatch.delenv("ELASTIC_CONFIG", raising=False)
    job = elastic.init()
    try:
        yield job
    finally:
        job.close()
