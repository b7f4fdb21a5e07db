from tests.runtime.conftest import jobs  # noqa: F401  (every job's processes ended at teardown)
