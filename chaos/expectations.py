"""Named expectations a scenario adds to the five invariants, one class each.

``faults-fired`` applies to every run; the others only where a scenario lists
them in ``Scenario.expect``.  Each fault kind's own expectation (what its fault
must have done to the run) comes from the kind (``FaultKind.expect``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from chaos.faults import read_storage_records
from chaos.invariants import Check, StoreState
from chaos.spec import Registry
from elastic.base.events import Event
from storage.errors import StaleWriterError

EXPECT_NO_EVICTION = "no-eviction"  # one World for the whole run, no failed collective
EXPECT_CHECKPOINT_FAILED = "checkpoint-failure-reported"  # the storage error surfaced
EXPECT_ALL_COMMITTED = "all-checkpoints-committed"  # transient faults absorbed by retries
EXPECT_STALE_REFUSED = "stale-commit-refused"  # a zombie's commit was refused
EXPECT_DAMAGE_DETECTED = "damage-detected"  # an injected torn/flipped file fails verify
EXPECT_JOINED = "joiners-trained"  # the World grew beyond the initial workers
EXPECT_FAULTS_FIRED = "faults-fired"  # every scheduled fault fired (always checked)


class Finished(Protocol):
    """A run after it ended, as an expectation reads it (chaos.run.Run)."""

    workers: int
    schedule: Any  # chaos.scenarios.Schedule
    records: list[dict[str, Any]]
    faults_dir: str

    def events(self, name: Event) -> list[dict[str, Any]]: ...

    def planned_checkpoints(self) -> list[int]: ...


class Expectation:
    name: ClassVar[str] = ""

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        raise NotImplementedError


EXPECTATIONS: Registry[Expectation] = Registry("expectation", __name__)


@EXPECTATIONS.register
class FaultsFired(Expectation):
    name = EXPECT_FAULTS_FIRED

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        out = []
        not_fired = [r["fault"] for r in run.records if not r.get("fired")]
        if run.records:
            out.append(
                Check(
                    self.name,
                    not not_fired,
                    f"not fired: {not_fired}"
                    if not_fired
                    else f"{len(run.records)} scheduled fault(s) fired",
                )
            )
        recorded = read_storage_records(run.faults_dir)
        for f in run.schedule.storage:
            if f.action == "fail":
                hits = sum(1 for r in recorded if r["fault"] == f.to_json())
                out.append(Check(self.name, hits > 0, f"{f.describe()}: injected {hits} time(s)"))
        return out


@EXPECTATIONS.register
class NoEviction(Expectation):
    name = EXPECT_NO_EVICTION

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        gens, fails = run.events(Event.GENERATION), run.events(Event.FAILURE)
        return [
            Check(
                self.name,
                len(gens) == 1 and not fails,
                f"{len(gens)} generation(s), {len(fails)} failed collective(s)",
            )
        ]


@EXPECTATIONS.register
class CheckpointFailureReported(Expectation):
    name = EXPECT_CHECKPOINT_FAILED

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        failed = run.events(Event.CHECKPOINT_FAILED)
        leaked = sorted({f.step for f in run.schedule.storage} & set(store.committed))
        return [
            Check(
                self.name,
                bool(failed) and not leaked,
                f"{len(failed)} checkpoint failure(s) reported"
                + (f"; faulted step(s) {leaked} committed anyway" if leaked else ""),
            )
        ]


@EXPECTATIONS.register
class AllCommitted(Expectation):
    name = EXPECT_ALL_COMMITTED

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        failed = run.events(Event.CHECKPOINT_FAILED)
        ckpts = set(run.planned_checkpoints())
        missing = sorted(ckpts - set(store.committed))
        return [
            Check(
                self.name,
                not missing and not failed,
                f"missing steps {missing}, {len(failed)} checkpoint failure(s)"
                if missing or failed
                else f"all {len(ckpts)} checkpoints committed",
            )
        ]


@EXPECTATIONS.register
class StaleRefused(Expectation):
    name = EXPECT_STALE_REFUSED

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        # The fence refused the zombie's commit: storage says so by the error's type.
        stale = [
            e
            for e in run.events(Event.CHECKPOINT_FAILED)
            if e.get("error_type") == StaleWriterError.__name__
        ]
        return [Check(self.name, bool(stale), f"{len(stale)} stale commit(s) refused")]


@EXPECTATIONS.register
class DamageDetected(Expectation):
    name = EXPECT_DAMAGE_DETECTED

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        damaged = run.schedule.corrupted_on_purpose
        undetected = sorted(s for s in damaged if s in store.committed and s not in store.bad)
        uncommitted = sorted(damaged - set(store.committed))
        return [
            Check(
                self.name,
                not undetected and not uncommitted,
                f"damaged step(s) {sorted(damaged)}: flagged by verify "
                f"{sorted(damaged & set(store.bad))}, not flagged {undetected}, "
                f"never committed {uncommitted}",
            )
        ]


@EXPECTATIONS.register
class Joined(Expectation):
    name = EXPECT_JOINED

    def check(self, run: Finished, store: StoreState) -> list[Check]:
        sizes = [len(e["world"]) for e in run.events(Event.GENERATION)]
        return [Check(self.name, max(sizes, default=0) > run.workers, f"World sizes {sizes}")]
