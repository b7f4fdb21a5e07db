"""The etcd key layout of a job, in one place.

    {prefix}/{job}/members/{id}   member record, under the member's lease
    {prefix}/{job}/ready/{id}     "ready for a World with generation >= N", under the lease
    {prefix}/{job}/ctl/gen        current generation (the fencing token)
    {prefix}/{job}/ctl/world      the current World (JSON), written with ctl/gen
    {prefix}/{job}/ctl/round     the generation being gathered (> gen while a re-form is due)
    {prefix}/{job}/ctl/leader     id of the member that forms Worlds, under its lease
    {prefix}/{job}/ctl/broken     newest generation known broken (member gone, collective failed)
    {prefix}/{job}/ctl/stop       set by a launcher: stop the job after a final checkpoint
    {prefix}/{job}/ctl/done       set by rank 0 when training finished
    {prefix}/{job}/commits/{step} checkpoint commits recorded under the generation fence
    {prefix}/{job}/waiting/{id}   "waiting in step S of generation G" (hang detection), under lease
    {prefix}/{job}/evicted/{id}   why a hung member was evicted (read by its launcher)

Everything a member must follow (``ctl/``) is a handful of keys, so watching it
costs O(1) events per World no matter how many members the job has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..base.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9_.-]+)+$")


def validate_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-63 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Keyspace:
    job: str
    prefix: str = "/elastic"

    def __post_init__(self) -> None:
        validate_name("job id", self.job)
        if not _PREFIX.match(self.prefix):
            raise ConfigError(f"invalid etcd key prefix {self.prefix!r}: expected like /elastic")

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.job}/"

    @property
    def members(self) -> str:
        return self.root + "members/"

    def member(self, member_id: str) -> str:
        return self.members + member_id

    @property
    def ready(self) -> str:
        return self.root + "ready/"

    def ready_of(self, member_id: str) -> str:
        return self.ready + member_id

    def lease_of(self, member_id: str) -> str:
        """The id of a worker's etcd lease, published so its launcher can revoke
        it the moment the process dies (survivors then need not wait a TTL)."""
        return self.root + "leases/" + member_id

    @property
    def ctl(self) -> str:
        return self.root + "ctl/"

    @property
    def gen(self) -> str:
        return self.ctl + "gen"

    @property
    def world(self) -> str:
        return self.ctl + "world"

    @property
    def round(self) -> str:
        return self.ctl + "round"

    @property
    def leader(self) -> str:
        return self.ctl + "leader"

    @property
    def broken(self) -> str:
        return self.ctl + "broken"

    @property
    def arrived(self) -> str:
        """Where each member says which World's group formation it reached."""
        return self.ctl + "arrived/"

    def arrived_of(self, member_id: str) -> str:
        return self.arrived + member_id

    @property
    def waiting(self) -> str:
        return self.root + "waiting/"

    @property
    def evicted(self) -> str:
        return self.root + "evicted/"

    @property
    def stop(self) -> str:
        return self.ctl + "stop"

    @property
    def done(self) -> str:
        return self.ctl + "done"

    @property
    def claim(self) -> str:
        """The launch that owns the job's checkpoint location (its claim token)."""
        return self.ctl + "checkpoint-claim"

    @property
    def commits(self) -> str:
        return self.root + "commits/"

    def commit(self, step: int) -> str:
        return f"{self.commits}{step:012d}"
