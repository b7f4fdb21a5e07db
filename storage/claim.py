"""The claim record: which launch of which job owns a checkpoint location.

    <root>/CLAIM.json   {"job", "instance", "host", "pid", "time"} in a sealed envelope

Created create-only (link(2) on local disk, a conditional put on object
stores), so of two launches racing for one location exactly one gets it; the
other is told who owns it.  `--resume` takes a location over by replacing the
record.  A committer that holds a claim checks before each commit that the
record still names it, so a launch that was taken over stops committing.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

from storage.manifest import seal, unseal
from storage.schema import Fields

CLAIM_FORMAT = "elastic-ckpt-claim"


@dataclass(frozen=True)
class Claim:
    job: str
    instance: str  # one launch of the job
    host: str
    pid: int
    time: float

    @classmethod
    def here(cls, job: str, instance: str) -> Claim:
        return cls(job, instance, socket.gethostname(), os.getpid(), time.time())

    def describe(self) -> str:
        when = datetime.datetime.fromtimestamp(self.time).isoformat(timespec="seconds")
        return (
            f"job {self.job!r} (launch {self.instance}, host {self.host}, pid {self.pid}, "
            f"since {when})"
        )


def encode_claim(claim: Claim) -> bytes:
    return seal(
        CLAIM_FORMAT,
        {
            "job": claim.job,
            "instance": claim.instance,
            "host": claim.host,
            "pid": claim.pid,
            "time": claim.time,
        },
    )


def decode_claim(data: bytes, where: str) -> Claim:
    # Unsigned even with a key: a forged claim can only stop commits, which whoever
    # can write it can do anyway by deleting files.
    body, _ = unseal(CLAIM_FORMAT, data, where, None)
    f = Fields(body, where, "claim")
    return Claim(f.str("job"), f.str("instance"), f.str("host"), f.int("pid"), f.number("time"))
