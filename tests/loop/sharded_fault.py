"""examples/own_loop.py with one fault placed inside the sharded step (tests only).

``SHARD_FAULT=KIND:STEP:RANK`` (once per job: the first process to fire it
leaves a marker file in the working directory; at the step that commits
STEP + 1, on rank RANK):

- ``pending``: the commit header completes, then raises on this rank as if
  it had failed here: the others commit and apply the step, this rank keeps
  the gradient and must roll the step forward in the next World;
- ``die``: SIGKILL right after this rank applied its shards, before the
  parameter exchange: the others' exchange fails after they committed.

A timing-free way to reach the two states a real failure reaches only by
chance (tests/loop/test_sharded.py).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from elastic.base.errors import WorkerGroupError
from elastic.train import job as jobmod
from elastic.train import sharded

KIND, STEP, RANK = os.environ["SHARD_FAULT"].split(":")
STEP_N, RANK_N = int(STEP), int(RANK)
MARKER = os.path.abspath("shard-fault.fired")


def _fire() -> bool:
    """True for the first caller in the job (an exclusive create)."""
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


_header = jobmod.Job._header


def header(self, kind, watch=None):
    out = _header(self, kind, watch)
    if (
        KIND == "pending"
        and kind == jobmod._APPLY
        and self.rank == RANK_N
        and self.registry.step == STEP_N
        and _fire()
    ):
        raise WorkerGroupError("injected: this rank's commit header failed after completing")
    return out


_exchange = sharded.ShardedState.exchange_params


def exchange(self, group, sources, watch=None):
    if KIND == "die" and group.rank == RANK_N and self.step == STEP_N + 1 and _fire():
        os.kill(os.getpid(), signal.SIGKILL)
    return _exchange(self, group, sources, watch)


jobmod.Job._header = header
sharded.ShardedState.exchange_params = exchange

if __name__ == "__main__":
    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "own_loop.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")
