"""A job's state as stored in etcd, for ``elastic status``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from .etcd import retry_call
from .keys import Keyspace
from .membership import Member
from .world import World


@dataclass(frozen=True)
class MemberStatus:
    id: str
    rank: int | None  # None: a standby or a joiner not yet in the World
    address: str
    lease_ttl_left: int  # seconds until the lease expires without keepalive
    age_s: float  # seconds since the member registered
    ready_for: int | None  # generation it waits for, if at a rendezvous


@dataclass(frozen=True)
class JobStatus:
    job: str
    generation: int
    round: int
    leader: str | None
    world_size: int
    members: tuple[MemberStatus, ...]
    last_commit_step: int | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_text(self) -> str:
        lines = [
            f"job {self.job}: generation {self.generation}"
            + (f" (re-forming generation {self.round})" if self.round > self.generation else "")
            + f", world size {self.world_size}, leader {self.leader or '-'}"
            + (f", last checkpoint step {self.last_commit_step}"
               if self.last_commit_step is not None else ""),
            f"{'rank':>4}  {'member':<24} {'address':<22} {'lease left':>10} {'age':>8}",
        ]
        for m in self.members:
            rank = str(m.rank) if m.rank is not None else "-"
            lines.append(
                f"{rank:>4}  {m.id:<24} {m.address or '-':<22} {m.lease_ttl_left:>9}s "
                f"{m.age_s:>7.0f}s"
            )
        if not self.members:
            lines.append("  (no live members)")
        return "\n".join(lines)


def read_status(client: Any, keys: Keyspace, timeout: float = 10.0) -> JobStatus:
    resp = retry_call(lambda: client.get_prefix_response(keys.root),
                      what=f"reading job {keys.job}", timeout=timeout)
    kv = {k.key.decode(): k for k in resp.kvs}

    def num(key: str, default: int = 0) -> int:
        return int(kv[key].value) if key in kv else default

    gen = num(keys.gen)
    world = World.from_json(kv[keys.world].value) if keys.world in kv else None
    now = time.time()
    members = []
    for key, rec in kv.items():
        if not key.startswith(keys.members):
            continue
        m = Member.from_json(rec.value)
        info = retry_call(lambda rec=rec: client.get_lease_info(rec.lease),
                          what="reading a lease", timeout=timeout)
        ready = kv.get(keys.ready_of(m.id))
        members.append(MemberStatus(
            id=m.id,
            rank=world.rank_of(m.id) if world else None,
            address=m.address,
            lease_ttl_left=int(info.TTL),
            age_s=max(0.0, now - m.registered_at) if m.registered_at else 0.0,
            ready_for=int(ready.value) if ready is not None else None,
        ))
    members.sort(key=lambda s: (s.rank is None, s.rank if s.rank is not None else 0, s.id))
    commits = [k for k in kv if k.startswith(keys.commits)]
    last = max((int(k[len(keys.commits):]) for k in commits), default=None)
    return JobStatus(
        job=keys.job,
        generation=gen,
        round=num(keys.round, gen),
        leader=kv[keys.leader].value.decode() if keys.leader in kv else None,
        world_size=world.size if world else 0,
        members=tuple(members),
        last_commit_step=last,
    )
