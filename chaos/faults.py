"""Fault injectors: what the chaos runner does to a running job.

Two families:

* **Process and server faults** (:class:`~chaos.spec.FaultSpec`), fired by the
  runner at a trigger (a training step, a checkpoint, a failure, a rendezvous in
  progress); each kind is one class in ``chaos/kinds.py`` and each trigger one
  class in ``chaos/triggers.py``, both registered by name.
* **Storage faults** (:class:`StorageFault`), applied inside each worker by the
  workload through :class:`~chaos.faultfs.FaultyFileSystem`: the plan travels in
  the ``CHAOS_WORKER_FAULTS`` environment variable (``elastic run`` passes its
  environment on to the workers), and the workload opens its checkpoint store
  through the Trainer's public ``checkpoint_store_factory``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from chaos.faultfs import Fault, FaultPlan, InjectedFault
from chaos.spec import JOINER, KINDS, TRIGGERS, FaultSpec, inject
from elastic.base.procutil import send_signal
from storage.layout import MANIFEST, step_dir

__all__ = [
    "BREAKS",
    "JOINER",
    "KINDS",
    "TRIGGERS",
    "FaultSpec",
    "StorageFault",
    "WorkerFaults",
    "inject",
    "manifest_glob",
    "part_glob",
    "read_storage_records",
    "send_signal",
    "shard_glob",
]

# Deliberately broken components the workload can plug in (``--break``): a
# sampler that does not re-split, a commit fence without the generation
# compare, a store that publishes the manifest first, a worker that never exits.
BREAKS = ("sampler", "fence", "store", "hang")


# -- storage faults (applied in the workers) -------------------------------------


@dataclass(frozen=True)
class StorageFault(Fault):
    """A :class:`~chaos.faultfs.Fault` as a schedule holds it: JSON, a path glob
    relative to the checkpoint root, and what the report needs to know.

    ``path`` is anchored at the root (``step-000000000020/g*/r00000-*/data-*``
    is rank 0's shard files of step 20), so a deliberately broken store that
    stages elsewhere does not match by accident.  ``corrupts`` marks faults that
    damage committed data on purpose (torn write, bit flip): the checkpoint
    invariant then requires that the damage is *detected*, not absent.
    """

    step: int | None = None  # the checkpoint step the glob targets, for the report
    permanent: bool = False  # fail: PermissionError (never retried) instead of a transient one

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.action == "crash":
            raise ValueError(
                "a storage fault cannot crash a worker's filesystem (kill the worker instead)"
            )
        if self.permanent and self.action != "fail":
            raise ValueError(f"only a fail fault can be permanent, got {self.action!r}")

    @property
    def corrupts(self) -> bool:
        return self.action in ("truncate", "bitflip")

    def describe(self) -> str:
        times = "forever" if self.times is None else f"x{self.times}"
        extra = f" {self.delay_s:g}s" if self.action == "delay" else ""
        if self.action == "fail":
            extra = " (permanent)" if self.permanent else " (transient)"
        ops = ",".join(sorted(self.ops)) if self.ops else "data"
        return f"storage {self.action}{extra} {times} on {ops} {self.path}"

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "path": self.path,
            "ops": sorted(self.ops) if self.ops is not None else None,
            "nth": self.nth,
            "times": self.times,
            "delay_s": self.delay_s,
            "keep": self.keep,
            "step": self.step,
            "permanent": self.permanent,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StorageFault:
        return cls(**d)

    def rooted(self, root: str, record_dir: str | None) -> StorageFault:
        """This fault with its glob anchored at ``root``; a fail fault's errors are
        noted in ``record_dir`` (see :func:`read_storage_records`)."""
        changes: dict[str, Any] = {"path": root.rstrip("/") + "/" + self.path}
        if self.action == "fail":
            changes["error"] = _Recorder(record_dir, self.to_json(), self.permanent)
        return dataclasses.replace(self, **changes)


def shard_glob(step: int, rank: int | None = None) -> str:
    """Shard data files of ``step`` (of one rank, or of all)."""
    who = f"r{rank:05d}-*" if rank is not None else "r*"
    return f"{step_dir(step)}/g*/{who}/data-*"


def part_glob(step: int) -> str:
    return f"{step_dir(step)}/g*/part-*"


def manifest_glob(step: int) -> str:
    """The manifest and its local-disk temp file."""
    return f"{step_dir(step)}/*{MANIFEST}"


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
        payload = {
            "storage": [f.to_json() for f in self.storage],
            "seed": self.seed,
            "slow_step_s": self.slow_step_s,
            "slow_steps": self.slow_steps,
            "record_dir": self.record_dir,
        }
        return {WORKER_FAULTS_ENV: json.dumps(payload)}

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WorkerFaults:
        raw = (os.environ if env is None else env).get(WORKER_FAULTS_ENV)
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(
            storage=tuple(StorageFault.from_json(f) for f in d.get("storage", ())),
            seed=int(d.get("seed", 0)),
            slow_step_s=float(d.get("slow_step_s", 0.0)),
            slow_steps=int(d.get("slow_steps", 0)),
            record_dir=d.get("record_dir"),
        )

    def fault_plan(self, root: str) -> FaultPlan:
        """The FaultyFileSystem plan, globs anchored at ``root`` (the store's path)."""
        return FaultPlan(
            faults=tuple(f.rooted(root, self.record_dir) for f in self.storage), seed=self.seed
        )


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
            fd = os.open(
                os.path.join(self.record_dir, "storage-faults.jsonl"),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                0o644,
            )
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        return PermissionError(message) if self.permanent else InjectedFault(message)


def read_storage_records(record_dir: str) -> list[dict[str, Any]]:
    """The ``fail`` faults workers noted in ``record_dir`` (see ``WorkerFaults.record_dir``)."""
    from elastic.base.events import read_events

    path = os.path.join(record_dir, "storage-faults.jsonl")
    return read_events(path) if os.path.exists(path) else []
