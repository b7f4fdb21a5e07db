"""Fault injectors: what the chaos runner does to a running job from outside.

Two families:

* **Process and server faults**, fired by the runner at a trigger (a training
  step, a checkpoint, a failure, a rendezvous in progress): SIGKILL a worker,
  SIGSTOP one past its lease TTL and SIGCONT it (a zombie), make one raise
  inside its step or run slowly (the workload reacts to SIGUSR1 / SIGUSR2),
  SIGKILL or SIGSTOP the etcd server and bring it back on its data dir, start
  extra workers (a burst of joins), kill everything and ``--resume``.
* **Storage faults**, applied inside each worker by the workload through
  :class:`~chaos.faultfs.FaultyFileSystem`: the plan travels in the
  ``CHAOS_WORKER_FAULTS`` environment variable (``elastic run`` passes its
  environment on to the workers), so the product code carries no test hook.

A fault names its target by *rank in the current World*; the runner maps rank
to member id (``generation`` events) and member id to pid (``spawn`` events)
at the moment it fires.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from chaos.faultfs import Fault, FaultPlan, InjectedFault

# -- process and server faults -------------------------------------------------

KILL_WORKER = "kill-worker"
PAUSE_WORKER = "pause-worker"  # SIGSTOP past the lease TTL, SIGCONT once evicted
STEP_EXCEPTION = "step-exception"  # SIGUSR1: the workload raises inside its next step
SLOW_RANK = "slow-rank"  # SIGUSR2: the workload's next steps take longer
KILL_ETCD = "kill-etcd"  # SIGKILL, outage, restart on the same data dir and port
RESTART_ETCD = "restart-etcd"  # bring back an etcd killed with duration 0
PAUSE_ETCD = "pause-etcd"  # SIGSTOP, outage, SIGCONT
JOIN = "join"  # a second `elastic run --job same -n count`
KILL_ALL_RESUME = "kill-all-resume"  # SIGKILL launchers and workers, then --resume

PROCESS_KINDS = (KILL_WORKER, PAUSE_WORKER, STEP_EXCEPTION, SLOW_RANK, KILL_ETCD, RESTART_ETCD,
                 PAUSE_ETCD, JOIN, KILL_ALL_RESUME)
WORKER_KINDS = (KILL_WORKER, PAUSE_WORKER, STEP_EXCEPTION, SLOW_RANK)

# When a fault fires (always after the previous fault of the schedule fired).
ON_STEP = "step"  # rank 0 reported step >= at_step
ON_CHECKPOINT = "checkpoint"  # rank 0 started or finished a checkpoint at step >= at_step
ON_FAILURE = "failure"  # a rank reported a failed collective
ON_RENDEZVOUS = "rendezvous"  # etcd shows a World being gathered or a joiner waiting
ON_FULL_WORLD = "full-world"  # a new World with the job's full worker count formed
ON_JOINER_READY = "joiner-ready"  # a member outside the World has asked to join it
TRIGGERS = (ON_STEP, ON_CHECKPOINT, ON_FAILURE, ON_RENDEZVOUS, ON_FULL_WORLD, ON_JOINER_READY)

# Target rank meaning "the newest worker that is not in the World yet".
JOINER = -1

STEP_EXCEPTION_SIGNAL = signal.SIGUSR1
SLOW_RANK_SIGNAL = signal.SIGUSR2

# Deliberately broken components the workload can plug in (``--break``): a
# sampler that does not re-split, a commit fence without the generation
# compare, a store that publishes the manifest first, a worker that never exits.
BREAKS = ("sampler", "fence", "store", "hang")


@dataclass(frozen=True)
class FaultSpec:
    """One scheduled fault.

    ``rank`` is the target's rank in the newest World when the fault fires (for
    worker faults); ``duration_s`` how long a pause or an etcd outage lasts (for
    a zombie: the longest it stays stopped while waiting to be evicted);
    (``kill-etcd`` with duration 0 leaves it down until a ``restart-etcd``);
    ``count`` how many workers a join adds; ``delay_s`` a deliberate offset
    after the trigger (to land inside a checkpoint save, say).
    """

    kind: str
    at_step: int = 0
    on: str = ON_STEP
    rank: int | None = None
    delay_s: float = 0.0
    duration_s: float = 0.0
    count: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PROCESS_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {list(PROCESS_KINDS)}")
        if self.on not in TRIGGERS:
            raise ValueError(f"unknown trigger {self.on!r}; known: {list(TRIGGERS)}")
        if self.at_step < 0 or self.delay_s < 0 or self.duration_s < 0 or self.count < 1:
            raise ValueError(f"fault {self.kind}: negative step/delay/duration or count < 1")
        if self.kind in WORKER_KINDS and (self.rank is None or self.rank < JOINER):
            raise ValueError(f"fault {self.kind} needs a target rank >= 0 (or JOINER), "
                             f"got {self.rank!r}")

    def describe(self) -> str:
        where = f"rank {self.rank} " if self.rank is not None else ""
        if self.rank == JOINER:
            where = "the joiner "
        when = {ON_STEP: f"at step {self.at_step}",
                ON_CHECKPOINT: f"at the checkpoint of step >= {self.at_step}",
                ON_FAILURE: "at the next failure",
                ON_RENDEZVOUS: "during the next rendezvous",
                ON_JOINER_READY: "once it asked to join",
                ON_FULL_WORLD: "once the World is full again"}[self.on]
        extra = ""
        if self.delay_s:
            extra += f" +{self.delay_s:g}s"
        if self.duration_s:
            extra += f" for {self.duration_s:g}s"
        if self.kind == JOIN:
            extra += f" ({self.count} worker(s))"
        return f"{self.kind} {where}{when}{extra}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- storage faults (applied in the workers) -------------------------------------


@dataclass(frozen=True)
class StorageFault:
    """A FaultyFileSystem fault with a path glob relative to the checkpoint root.

    ``path`` is anchored at the root (``step-000000000020/g*/r00000-*/data-*``
    is rank 0's shard files of step 20), so a deliberately broken store that
    stages elsewhere does not match by accident.  ``corrupts`` marks faults that
    damage committed data on purpose (torn write, bit flip): the checkpoint
    invariant then requires that the damage is *detected*, not absent.
    """

    action: str  # fail | delay | truncate | bitflip
    path: str
    ops: tuple[str, ...] | None = None
    nth: int = 1
    times: int | None = 1
    delay_s: float = 0.0
    keep: float = 0.5
    step: int | None = None  # the checkpoint step the glob targets, for the report
    permanent: bool = False  # fail: PermissionError (never retried) instead of a transient one

    @property
    def corrupts(self) -> bool:
        return self.action in ("truncate", "bitflip")

    def describe(self) -> str:
        times = "forever" if self.times is None else f"x{self.times}"
        extra = f" {self.delay_s:g}s" if self.action == "delay" else ""
        if self.action == "fail":
            extra = " (permanent)" if self.permanent else " (transient)"
        ops = ",".join(self.ops) if self.ops else "data"
        return f"storage {self.action}{extra} {times} on {ops} {self.path}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = list(self.ops) if self.ops is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StorageFault:
        d = dict(d)
        if d.get("ops") is not None:
            d["ops"] = tuple(d["ops"])
        return cls(**d)


def step_glob(step: int) -> str:
    """The step directory of ``step`` as the store names it."""
    return f"step-{step:012d}"


def shard_glob(step: int, rank: int | None = None) -> str:
    """Shard data files of ``step`` (of one rank, or of all)."""
    who = f"r{rank:05d}-*" if rank is not None else "r*"
    return f"{step_glob(step)}/g*/{who}/data-*"


def part_glob(step: int) -> str:
    return f"{step_glob(step)}/g*/part-*"


def manifest_glob(step: int) -> str:
    """The manifest and its local-disk temp file."""
    return f"{step_glob(step)}/*manifest.json"


# -- what the workload reads from its environment --------------------------------

WORKER_FAULTS_ENV = "CHAOS_WORKER_FAULTS"


@dataclass(frozen=True)
class WorkerFaults:
    """In-worker fault settings, handed to every worker through the environment."""

    storage: tuple[StorageFault, ...] = ()
    seed: int = 0
    slow_step_s: float = 0.0  # extra seconds per step after SIGUSR2 ...
    slow_steps: int = 0  # ... for this many steps
    record_dir: str | None = None  # where workers note injected faults they observed

    def to_env(self) -> dict[str, str]:
        payload = {"storage": [f.to_json() for f in self.storage], "seed": self.seed,
                   "slow_step_s": self.slow_step_s, "slow_steps": self.slow_steps,
                   "record_dir": self.record_dir}
        return {WORKER_FAULTS_ENV: json.dumps(payload)}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WorkerFaults:
        raw = (os.environ if env is None else env).get(WORKER_FAULTS_ENV)
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(storage=tuple(StorageFault.from_json(f) for f in d.get("storage", ())),
                    seed=int(d.get("seed", 0)), slow_step_s=float(d.get("slow_step_s", 0.0)),
                    slow_steps=int(d.get("slow_steps", 0)), record_dir=d.get("record_dir"))

    def fault_plan(self, root: str) -> FaultPlan:
        """The FaultyFileSystem plan, globs anchored at ``root`` (the store's path)."""
        return FaultPlan(faults=tuple(_to_fault(f, root, self.record_dir) for f in self.storage),
                         seed=self.seed)


@dataclass
class _Recorder:
    """Makes the errors of ``fail`` faults and notes each one in ``record_dir``."""

    record_dir: str | None
    spec: dict[str, Any] = field(default_factory=dict)
    permanent: bool = False

    def __call__(self, message: str) -> BaseException:
        if self.record_dir:
            os.makedirs(self.record_dir, exist_ok=True)
            line = json.dumps({"pid": os.getpid(), "message": message, "fault": self.spec})
            fd = os.open(os.path.join(self.record_dir, "storage-faults.jsonl"),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        return PermissionError(message) if self.permanent else InjectedFault(message)


def _to_fault(f: StorageFault, root: str, record_dir: str | None) -> Fault:
    path = root.rstrip("/") + "/" + f.path
    ops: Iterable[str] | None = f.ops
    if f.action == "fail":
        return Fault.fail(ops, path, nth=f.nth, times=f.times,
                          error=_Recorder(record_dir, f.to_json(), f.permanent))
    if f.action == "delay":
        return Fault.delay(f.delay_s, ops, path, nth=f.nth, times=f.times)
    if f.action == "truncate":
        return Fault.truncate(ops, path, nth=f.nth, times=f.times, keep=f.keep)
    if f.action == "bitflip":
        return Fault.bitflip(ops, path, nth=f.nth, times=f.times)
    raise ValueError(f"unknown storage fault action {f.action!r}")


def read_storage_records(record_dir: str) -> list[dict[str, Any]]:
    """The ``fail`` faults workers noted in ``record_dir`` (see ``WorkerFaults.record_dir``)."""
    from elastic.events import read_events

    path = os.path.join(record_dir, "storage-faults.jsonl")
    return read_events(path) if os.path.exists(path) else []


# -- signals ---------------------------------------------------------------------


def send_signal(pid: int, sig: int) -> bool:
    """Signal ``pid``; False when it is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# -- firing a scheduled fault ------------------------------------------------------


class Target(Protocol):
    """What a fault acts on: the runner's view of one running job."""

    etcd: Any  # elastic.etcd.EmbeddedEtcd

    def worker(self, rank: int) -> tuple[str, int] | None:
        """(member id, pid) of ``rank`` in the newest World (or of the newest worker
        outside it, for ``JOINER``), if it is still running."""

    def wait_evicted(self, member: str, longest_s: float) -> bool:
        """Wait until a World without ``member`` formed (at least one lease TTL)."""

    def join(self, count: int) -> str:
        """Start ``count`` more workers for the job; returns a description."""

    def kill_all_and_resume(self) -> str:
        """SIGKILL every launcher and worker, then start the job again with --resume."""


def inject(spec: FaultSpec, target: Target) -> dict[str, Any]:
    """Fire ``spec`` now; the record says what was hit and whether it took effect."""
    record: dict[str, Any] = {"kind": spec.kind, "t": time.time(), "fault": spec.describe()}
    kind = spec.kind
    if kind in WORKER_KINDS:
        assert spec.rank is not None
        found = target.worker(spec.rank)
        if found is None:
            record.update(fired=False, detail=f"no running worker at rank {spec.rank}")
            return record
        member, pid = found
        record.update(member=member, pid=pid, rank=spec.rank)
        if kind == PAUSE_WORKER:
            stopped = time.monotonic()
            fired = send_signal(pid, signal.SIGSTOP)
            try:
                evicted = fired and target.wait_evicted(member, spec.duration_s)
            finally:
                send_signal(pid, signal.SIGCONT)
            record.update(evicted=evicted, stopped_s=round(time.monotonic() - stopped, 3))
        else:
            sig = {KILL_WORKER: signal.SIGKILL, STEP_EXCEPTION: STEP_EXCEPTION_SIGNAL,
                   SLOW_RANK: SLOW_RANK_SIGNAL}[kind]
            fired = send_signal(pid, sig)
        record["fired"] = fired
        if not fired:
            record["detail"] = f"pid {pid} was already gone"
        return record
    etcd = target.etcd
    if kind == KILL_ETCD:
        etcd.kill()
        if spec.duration_s:
            time.sleep(spec.duration_s)  # the outage itself
            etcd.restart()
    elif kind == RESTART_ETCD:
        etcd.restart()
    elif kind == PAUSE_ETCD:
        etcd.pause()
        try:
            time.sleep(spec.duration_s)  # the outage itself
        finally:
            etcd.resume()
    elif kind == JOIN:
        record["detail"] = target.join(spec.count)
    elif kind == KILL_ALL_RESUME:
        record["detail"] = target.kill_all_and_resume()
    record["fired"] = True
    return record
