"""A job's keys in etcd, parsed: the one reading of the layout in :mod:`.keys`.

The coordinator parses its mirror of the job's keys with :meth:`JobState.parse`;
``elastic status`` and the chaos runner parse one range read of them
(:func:`read_job_state`). One parser, so what a key means cannot drift apart
between the code that forms Worlds and the code that reports on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .keys import Keyspace
from .membership import KeyValue
from .world import World


def int_value(kv: KeyValue | None, default: int = 0) -> int:
    """An integer key (``ctl/gen``, ``ctl/round``, ``ctl/broken``, ...); ``default`` if absent."""
    return int(kv.value) if kv is not None else default


def read_world(snapshot: Mapping[str, KeyValue], keys: Keyspace) -> World | None:
    kv = snapshot.get(keys.world)
    return World.from_json(kv.value) if kv is not None else None


@dataclass(frozen=True)
class JobState:
    """What a job's keys say at one revision."""

    generation: int  # ctl/gen, the fencing token (0 before the first World)
    round: int  # the generation being gathered: > generation while a re-form is due
    world: World | None
    leader: str | None
    members: dict[str, KeyValue]  # live member id -> its record (under the member's lease)
    ready: dict[str, int]  # member id -> the generation it waits for at a rendezvous
    last_commit_step: int | None  # the newest step with a commit record
    finished_step: int | None  # ctl/done: training finished at this step

    @property
    def world_ids(self) -> set[str]:
        return set(self.world.ids) if self.world is not None else set()

    @classmethod
    def parse(cls, snapshot: Mapping[str, KeyValue], keys: Keyspace) -> JobState:
        """``snapshot`` maps full keys (any subset of the job's) to their values."""
        members: dict[str, KeyValue] = {}
        ready: dict[str, int] = {}
        last: int | None = None
        for key, kv in snapshot.items():
            if key.startswith(keys.members):
                members[key[len(keys.members) :]] = kv
            elif key.startswith(keys.ready):
                ready[key[len(keys.ready) :]] = int(kv.value)
            elif key.startswith(keys.commits):
                step = key[len(keys.commits) :]
                # Only the runtime writes here; a foreign key must not stop the coordinator.
                if step.isdigit():
                    last = int(step) if last is None else max(last, int(step))
        gen = int_value(snapshot.get(keys.gen))
        leader = snapshot.get(keys.leader)
        done = snapshot.get(keys.done)
        return cls(
            generation=gen,
            round=int_value(snapshot.get(keys.round), gen),
            world=read_world(snapshot, keys),
            leader=leader.value.decode() if leader is not None else None,
            members=members,
            ready=ready,
            last_commit_step=last,
            finished_step=int_value(done) if done is not None else None,
        )


def read_job_state(client: Any, keys: Keyspace) -> JobState | None:
    """The job's keys, read at one revision and parsed; None when this etcd has none.

    One range read, not retried: the caller bounds it (``retry_call``) or takes
    an etcd error as "unknown for now".
    """
    resp = client.get_prefix_response(keys.root)
    if not resp.kvs:
        return None
    return JobState.parse({kv.key.decode(): KeyValue.of(kv) for kv in resp.kvs}, keys)
