"""A job's state as stored in etcd, for ``elastic status``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..base.errors import ConfigError
from ..base.events import Event, read_events
from ..coord.etcd import retry_call
from ..coord.jobstate import read_job_state
from ..coord.keys import Keyspace
from ..coord.membership import Member
from .progress import RunStats, format_line


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
    finished_step: int | None = None  # set (from ctl/done) once training finished

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def to_text(self) -> str:
        lines = [
            f"job {self.job}: "
            + (f"finished at step {self.finished_step}, " if self.finished_step is not None else "")
            + f"generation {self.generation}"
            + (f" (re-forming generation {self.round})" if self.round > self.generation else "")
            + f", world size {self.world_size}, leader {self.leader or '-'}"
            + (
                f", last checkpoint step {self.last_commit_step}"
                if self.last_commit_step is not None
                else ""
            ),
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
    state = retry_call(
        lambda: read_job_state(client, keys), what=f"reading job {keys.job}", timeout=timeout
    )
    if state is None:
        raise ConfigError(
            f"no job {keys.job!r} in this etcd (key prefix {keys.prefix}): check --job, "
            "--etcd and --etcd-prefix (a finished job's embedded etcd stops with its launcher)"
        )
    world = state.world
    now = time.time()
    members = []
    for rec in state.members.values():
        m = Member.from_json(rec.value)
        info = retry_call(
            lambda rec=rec: client.get_lease_info(rec.lease),
            what="reading a lease",
            timeout=timeout,
        )
        ready = state.ready.get(m.id)
        members.append(
            MemberStatus(
                id=m.id,
                rank=world.rank_of(m.id) if world else None,
                address=m.address,
                lease_ttl_left=int(info.TTL),
                age_s=max(0.0, now - m.registered_at) if m.registered_at else 0.0,
                ready_for=ready,
            )
        )
    members.sort(key=lambda s: (s.rank is None, s.rank if s.rank is not None else 0, s.id))
    return JobStatus(
        job=keys.job,
        generation=state.generation,
        round=state.round,
        leader=state.leader,
        world_size=world.size if world else 0,
        members=tuple(members),
        last_commit_step=state.last_commit_step,
        finished_step=state.finished_step,
    )


@dataclass(frozen=True)
class LogProgress:
    """Steps, loss and throughput as the job's event log tells them (etcd holds no steps)."""

    path: str
    step: int
    total_steps: int | None
    loss: float | None
    samples_per_s: float | None
    world: int | None
    finished: bool
    line: str
    last_events: tuple[str, ...]

    def to_text(self) -> str:
        out = [
            f"progress (from {self.path}): {self.line}"
            + (", training finished" if self.finished else "")
        ]
        if self.last_events:
            out.append("last events:")
            out += [f"  {e}" for e in self.last_events]
        return "\n".join(out)


_EVENT_FIELDS = ("member", "rank", "gen", "step", "rc", "seconds", "error")


def _describe(ev: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(float(ev.get("t", 0))))
    fields = " ".join(f"{k}={ev[k]}" for k in _EVENT_FIELDS if k in ev)
    return f"{when} {ev.get('event')} {fields}".rstrip()[:160]


def read_log_progress(path: str, last: int = 5) -> LogProgress:
    try:
        events = read_events(path)
    except OSError as exc:
        raise ConfigError(f"event log {path!r} cannot be read: {exc}") from exc
    st = RunStats()
    for ev in events:
        st.apply(ev)
    rate = st.steps_per_s()
    notable = [e for e in events if e.get("event") != Event.STEP][-last:]
    return LogProgress(
        path=path,
        step=st.step,
        total_steps=st.total_steps,
        loss=st.loss,
        samples_per_s=rate * st.global_batch if rate is not None and st.global_batch else None,
        world=st.world,
        finished=st.finished,
        line=format_line(st),
        last_events=tuple(_describe(e) for e in notable),
    )
