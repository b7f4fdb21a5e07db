"""The fault model: a scheduled fault (:class:`FaultSpec`), what kind it is, when it fires.

A fault *kind* is one class (:class:`FaultKind`, in ``chaos/kinds.py``) that
validates its spec, describes it, fires it against the running job (a
:class:`Target`) and says what it expects of the run afterwards; a *trigger*
is one class (:class:`Trigger`, in ``chaos/triggers.py``) that says when a
spec is due.  Both are registered by name, so the runner, the scenarios and
the workload look them up instead of branching on strings: adding a fault
kind is adding one class.
"""

from __future__ import annotations

import importlib
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from chaos.invariants import Check
from elastic.base.events import Event

# Target rank meaning "the newest worker that is not in the World yet".
JOINER = -1
# Target rank meaning "a server (a process that owns shards and computes nothing,
# ``elastic run --servers``) in the newest World".
SERVER = -2

T = TypeVar("T")


class Registry(Generic[T]):
    """Named singletons of one family; the built-in ones load on first lookup."""

    def __init__(self, what: str, builtins: str) -> None:
        self.what = what
        self._builtins = builtins  # the module whose import registers them
        self._items: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = cls()
        return cls

    def _load(self) -> dict[str, T]:
        # Imported here, not at the top: the built-ins import this module.
        importlib.import_module(self._builtins)
        return self._items

    def __getitem__(self, name: str) -> T:
        items = self._load()
        if name not in items:
            raise ValueError(f"unknown {self.what} {name!r}; known: {sorted(items)}")
        return items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))

    def values(self) -> list[T]:
        return list(self._load().values())


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
    on: str = "step"
    rank: int | None = None
    delay_s: float = 0.0
    duration_s: float = 0.0
    count: int = 1

    def __post_init__(self) -> None:
        kind, _ = KINDS[self.kind], TRIGGERS[self.on]  # both raise on unknown names
        if self.at_step < 0 or self.delay_s < 0 or self.duration_s < 0 or self.count < 1:
            raise ValueError(f"fault {self.kind}: negative step/delay/duration or count < 1")
        kind.validate(self)

    def describe(self) -> str:
        where = ""
        if self.rank == JOINER:
            where = "the joiner "
        elif self.rank == SERVER:
            where = "a server "
        elif self.rank is not None:
            where = f"rank {self.rank} "
        extra = ""
        if self.delay_s:
            extra += f" +{self.delay_s:g}s"
        if self.duration_s:
            extra += f" for {self.duration_s:g}s"
        return f"{self.kind} {where}{TRIGGERS[self.on].describe(self)}{extra}" + KINDS[
            self.kind
        ].detail(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FaultSpec:
        return cls(**d)


# -- what faults act on and what triggers and expectations look at ------------------


class Target(Protocol):
    """The runner's view of one running job, as a fault kind acts on it."""

    etcd: Any  # elastic.coord.etcd.EmbeddedEtcd, or a chaos.etcdcluster.EtcdCluster
    token: str  # every process of the run carries it (see chaos.procs)

    def worker(self, rank: int) -> tuple[str, int] | None:
        """(member id, pid) of ``rank`` in the newest World (or of the newest worker
        outside it, for ``JOINER``; of a server in it, for ``SERVER``), if it is
        still running."""

    def wait_evicted(self, member: str, longest_s: float) -> bool:
        """Wait until a World without ``member`` formed (at least one lease TTL)."""

    def join(self, count: int) -> tuple[str, int]:
        """Start ``count`` more workers (a new launcher): (description, launcher pid)."""

    def kill_all_and_resume(self) -> str:
        """SIGKILL every launcher and worker, then start the job again with --resume."""

    def launchers_running(self) -> list[int]:
        """Pids of this job's launchers that are still running."""

    def spawned_by(self, launcher_pid: int) -> list[tuple[str, int]]:
        """(member id, pid) of every worker the launcher ``launcher_pid`` started."""

    def host_of(self, pid: int) -> Any:
        """The test-bed host (``chaos.netbed.Host``) ``pid`` runs on; None without
        ``--hosts`` or when it runs elsewhere."""


class RunView(Protocol):
    """What triggers and expectations read: the run's events and rendezvous state."""

    workers: int  # the job's full worker count

    def current_events(self) -> list[dict[str, Any]]:
        """Events of the current segment (a resume starts a new one), in order."""

    def events(self, name: Event) -> list[dict[str, Any]]:
        """Events called ``name`` of every segment."""

    def rendezvous_in_progress(self) -> bool: ...

    def joiner_ready(self) -> bool: ...


# -- the two registered families -------------------------------------------------------


class FaultKind:
    """One kind of fault.  Subclasses set ``name`` and override what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_rank: ClassVar[bool] = False  # aimed at one worker (``FaultSpec.rank``)
    signal: ClassVar[int | None] = None  # delivered to the workload (see ``in_worker``)
    # Set when the kind needs ``duration_s > 0``: what the duration is, in words.
    duration_means: ClassVar[str | None] = None
    # What ``expect`` checks, in words ("" when it checks nothing beyond the
    # invariants); ``elastic chaos list --kinds`` prints it next to ``summary``.
    expects: ClassVar[str] = ""
    # Found only by a peer (a hang, a freeze): a World of one has nobody to
    # find it, so a random schedule (the soak) aims it only at larger Worlds.
    needs_peer: ClassVar[bool] = False

    def validate(self, spec: FaultSpec) -> None:
        if self.needs_rank and (spec.rank is None or spec.rank < SERVER):
            raise ValueError(
                f"fault {self.name} needs a target rank >= 0 (or JOINER, SERVER), got {spec.rank!r}"
            )
        if self.duration_means and spec.duration_s <= 0:
            raise ValueError(
                f"fault {self.name} needs duration_s > 0 "
                f"({self.duration_means}), got {spec.duration_s!r}"
            )

    def detail(self, spec: FaultSpec) -> str:
        """Words added to ``FaultSpec.describe`` (after a space), if any."""
        return ""

    def to_json(self) -> dict[str, Any]:
        """What ``elastic chaos list --kinds`` says of the kind."""
        return {
            "name": self.name,
            "summary": self.summary,
            "needs_rank": self.needs_rank,
            "duration": self.duration_means,
            "expects": self.expects,
            "signal": None if self.signal is None else signal.Signals(self.signal).name,
        }

    def fire(self, spec: FaultSpec, target: Target, record: dict[str, Any]) -> bool:
        """Inflict the fault now; note what was hit in ``record``; False if nothing was."""
        raise NotImplementedError

    def expect(self, spec: FaultSpec, record: dict[str, Any], run: RunView) -> list[Check]:
        """What the run must show after this fault fired (beyond the invariants)."""
        return []

    def in_worker(self, worker: Any) -> None:
        """Inside the workload, on ``signal`` (a signal handler: keep it short, except
        for a hang, which is the point)."""
        raise NotImplementedError


class Trigger:
    """When a fault is due.  ``since`` is the event index after the previous fault."""

    name: ClassVar[str] = ""

    def describe(self, spec: FaultSpec) -> str:
        raise NotImplementedError

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        raise NotImplementedError


KINDS: Registry[FaultKind] = Registry("fault kind", "chaos.kinds")
TRIGGERS: Registry[Trigger] = Registry("trigger", "chaos.triggers")


def inject(spec: FaultSpec, target: Target) -> dict[str, Any]:
    """Fire ``spec`` now; the record says what was hit and whether it took effect."""
    record: dict[str, Any] = {"kind": spec.kind, "t": time.time(), "fault": spec.describe()}
    record["fired"] = KINDS[spec.kind].fire(spec, target, record)
    return record
