"""When a scheduled fault fires, one class each (see :class:`chaos.spec.Trigger`).

A fault is awaited only after the previous fault of its schedule fired;
``since`` is the index (in the current segment's events) after that fault, so
event triggers never fire on what happened before it.
"""

from __future__ import annotations

from chaos.spec import TRIGGERS, FaultSpec, RunView, Trigger
from elastic.base.events import Event


@TRIGGERS.register
class OnStep(Trigger):
    """Rank 0 reported step >= ``at_step``."""

    name = "step"

    def describe(self, spec: FaultSpec) -> str:
        return f"at step {spec.at_step}"

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        return any(
            e["event"] == Event.STEP and e["step"] >= spec.at_step for e in run.current_events()
        )


@TRIGGERS.register
class OnCheckpoint(Trigger):
    """Rank 0 started or finished a checkpoint at step >= ``at_step``."""

    name = "checkpoint"

    def describe(self, spec: FaultSpec) -> str:
        return f"at the checkpoint of step >= {spec.at_step}"

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        return any(
            e["event"] == Event.CHECKPOINT and e["step"] >= spec.at_step
            for e in run.current_events()
        )


@TRIGGERS.register
class OnFailure(Trigger):
    """A rank reported a failed collective."""

    name = "failure"

    def describe(self, spec: FaultSpec) -> str:
        return "at the next failure"

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        return any(e["event"] == Event.FAILURE for e in run.current_events()[since:])


@TRIGGERS.register
class OnFullWorld(Trigger):
    """A new World with the job's full worker count formed."""

    name = "full-world"

    def describe(self, spec: FaultSpec) -> str:
        return "once the World is full again"

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        return any(
            e["event"] == Event.GENERATION and len(e["world"]) >= run.workers
            for e in run.current_events()[since:]
        )


@TRIGGERS.register
class OnRendezvous(Trigger):
    """etcd shows a World being gathered or a joiner waiting."""

    name = "rendezvous"

    def describe(self, spec: FaultSpec) -> str:
        return "during the next rendezvous"

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        return run.rendezvous_in_progress()


@TRIGGERS.register
class OnJoinerReady(Trigger):
    """A member outside the World has asked to join it."""

    name = "joiner-ready"

    def describe(self, spec: FaultSpec) -> str:
        return "once it asked to join"

    def hit(self, spec: FaultSpec, run: RunView, since: int) -> bool:
        return run.joiner_ready()
