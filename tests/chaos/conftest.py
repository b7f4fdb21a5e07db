"""Process hygiene for the chaos tests: nothing a test started may outlive it."""

from tests.elastic.conftest import no_leftover_processes

__all__ = ["no_leftover_processes"]
