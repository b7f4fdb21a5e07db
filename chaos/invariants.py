"""The invariants a chaos run must keep, checked from its artifacts.

Each check takes what the runner collected (final parameters, sample ledgers,
the checkpoint location, etcd's revision history, the run's timing) and
returns a :class:`Check`: held or not, and a one-line reason a user can act
on.  A check that cannot be evaluated (missing data) does not hold.

1. ``params``       the job finished (launcher exit 0, rank 0 reported the end)
                    and the final parameters of every worker that finished
                    equal the failure-free reference within ``tolerance``.
2. ``exactly-once`` for every step the attempt whose update survived (the
                    newest run segment, then the newest generation that
                    attempted it) consumed each sample of each epoch once.
3. ``checkpoints``  every committed checkpoint verifies (unless a scenario
                    damaged it on purpose: then the damage must be detected),
                    none seen earlier has vanished, the last step is
                    committed, and every restore loaded the newest intact step
                    committed before it began.
4. ``fencing``      every commit recorded in etcd was made while its
                    generation was current, and every committed manifest has
                    such a commit record.
5. ``no-hang``      the run ended by itself within its bound.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PARAMS = "params"
EXACTLY_ONCE = "exactly-once"
CHECKPOINTS = "checkpoints"
FENCING = "fencing"
NO_HANG = "no-hang"
INVARIANTS = (PARAMS, EXACTLY_ONCE, CHECKPOINTS, FENCING, NO_HANG)
DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Check:
    name: str
    held: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "held": self.held, "detail": self.detail}


def _ids(values: Iterable[int], most: int = 8) -> str:
    values = sorted(values)
    shown = ", ".join(map(str, values[:most]))
    return f"[{shown}{', ...' if len(values) > most else ''}] ({len(values)})"


# -- 1. parameters ------------------------------------------------------------------


def load_params(out_dir: str) -> dict[str, dict[str, Any]]:
    """member id -> state dict, for every worker that wrote final parameters."""
    import torch

    found = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.pt"))):
        found[os.path.basename(path)[:-3]] = torch.load(path, weights_only=True)
    return found


def max_param_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for key in a:
        if a[key].shape != b[key].shape:
            return float("inf")
        diff = (a[key].double() - b[key].double()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def check_params(
    finals: dict[str, dict[str, Any]],
    reference: dict[str, Any] | None,
    tolerance: float = DEFAULT_TOLERANCE,
    unfinished: str | None = None,
) -> Check:
    """``unfinished``: why the job as a whole did not finish (then it has no final
    parameters, whatever single workers wrote before it failed)."""
    if reference is None:
        return Check(PARAMS, False, "no reference parameters to compare with")
    if unfinished:
        return Check(PARAMS, False, f"the job did not finish: {unfinished}")
    if not finals:
        return Check(PARAMS, False, "no worker finished training (no final parameters)")
    diffs = {member: max_param_diff(p, reference) for member, p in finals.items()}
    worst_member = max(diffs, key=diffs.get)
    worst = diffs[worst_member]
    if worst <= tolerance:
        return Check(
            PARAMS, True, f"{len(finals)} finisher(s), max |diff| {worst:.2e} <= {tolerance:g}"
        )
    return Check(
        PARAMS,
        False,
        f"{worst_member}: max |diff| {worst:.3g} > {tolerance:g} "
        f"({sum(d > tolerance for d in diffs.values())} of "
        f"{len(finals)} finisher(s) differ)",
    )


# -- 2. exactly once ------------------------------------------------------------------


def read_ledgers(dirs: Sequence[str]) -> list[dict[str, Any]]:
    """Ledger records of each run segment, in segment order, tagged with ``seg``."""
    from elastic.base.events import read_events  # JSONL, a torn last line skipped

    records = []
    for seg, directory in enumerate(dirs):
        for path in sorted(glob.glob(os.path.join(directory, "ledger-*.jsonl"))):
            records.extend({**rec, "seg": seg} for rec in read_events(path))
    return records


def surviving_attempts(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """step -> the records of the attempt whose update survived.

    A step redone after a rollback is attempted again by a newer generation;
    a step redone after a restore from a checkpoint, by a newer run segment
    (generation numbers start over when a job is resumed under a new id).
    """
    by_step: dict[int, dict[tuple[int, int], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        by_step[rec["step"]][(rec["seg"], rec["gen"])].append(rec)
    return {step: attempts[max(attempts)] for step, attempts in by_step.items()}


def steps_redone(records: list[dict[str, Any]]) -> int:
    """Attempts beyond the first of each step: compute lost to failures."""
    attempts: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for rec in records:
        attempts[rec["step"]].add((rec["seg"], rec["gen"]))
    return sum(len(a) - 1 for a in attempts.values())


def expected_epochs(
    dataset_size: int, batch_size: int, seed: int, total_steps: int
) -> dict[int, list[int]]:
    """epoch -> sample ids a failure-free run consumes, from the sampler itself."""
    from elastic.train.sampler import ElasticSampler

    sampler = ElasticSampler(dataset_size, batch_size, seed=seed)
    out: dict[int, list[int]] = defaultdict(list)
    for _ in range(total_steps):
        out[sampler.epoch].extend(sampler.global_batch())
        sampler.advance()
    return dict(out)


def check_exactly_once(
    records: list[dict[str, Any]], expected: dict[int, list[int]], total_steps: int
) -> Check:
    if not records:
        return Check(EXACTLY_ONCE, False, "no ledger records")
    survived = surviving_attempts(records)
    missing_steps = [s for s in range(total_steps) if s not in survived]
    seen: dict[int, Counter] = defaultdict(Counter)
    for step in sorted(survived):
        if step >= total_steps:
            continue
        for rec in survived[step]:
            seen[rec["epoch"]].update(rec["ids"])
    problems = []
    if missing_steps:
        problems.append(f"steps never completed: {_ids(missing_steps)}")
    for epoch in sorted(set(expected) | set(seen)):
        want = Counter(expected.get(epoch, ()))
        got = seen.get(epoch, Counter())
        missing = set(want) - set(got)
        dup = [i for i, c in got.items() if c > 1]
        extra = set(got) - set(want)
        if missing:
            problems.append(f"epoch {epoch}: samples never seen {_ids(missing)}")
        if dup:
            problems.append(f"epoch {epoch}: samples seen more than once {_ids(dup)}")
        if extra:
            problems.append(f"epoch {epoch}: samples not in this epoch {_ids(extra)}")
    if problems:
        # A soak has thousands of epochs: name the first few problems only.
        more = f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else ""
        return Check(EXACTLY_ONCE, False, "; ".join(problems[:8]) + more)
    sizes = {e: sum(seen[e].values()) for e in sorted(seen)}
    if len(sizes) > 8:
        counts = (
            f"{len(sizes)} epochs of {min(sizes.values())}"
            + (f"-{max(sizes.values())}" if max(sizes.values()) > min(sizes.values()) else "")
            + " samples"
        )
    else:
        counts = ", ".join(f"epoch {e}: {n}" for e, n in sizes.items())
    return Check(EXACTLY_ONCE, True, f"{total_steps} steps, each sample once ({counts})")


# -- 3. checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoreState:
    """What the checkpoint location held at one moment."""

    committed: dict[int, dict[str, Any]]  # step -> {"generation", "created"}
    bad: dict[int, str]  # committed step -> why it does not verify


def inspect_store(url: str) -> StoreState:
    """List and fully verify every committed checkpoint under ``url``."""
    from storage import CheckpointStore, StorageError

    store = CheckpointStore(url)
    committed = {
        info.step: {"generation": info.generation, "created": info.created} for info in store.list()
    }
    bad: dict[int, str] = {}
    if committed:
        try:
            report = store.verify()
        except StorageError as exc:
            return StoreState(committed, {s: f"verify failed: {exc}" for s in committed})
        for step_report in report.steps:
            if not step_report.ok:
                bad[step_report.step] = "; ".join(p.reason for p in step_report.problems)
    return StoreState(committed, bad)


@dataclass(frozen=True)
class Restore:
    t: float  # when the restore finished (event time)
    step: int
    segment: int


def check_checkpoints(
    final: StoreState,
    earlier: Sequence[StoreState],
    restores: Sequence[Restore],
    resumed_segments: Sequence[int],
    last_step: int | None,
    corrupted_on_purpose: set[int],
) -> Check:
    problems = []
    torn = {s: why for s, why in final.bad.items() if s not in corrupted_on_purpose}
    for step, why in sorted(torn.items()):
        problems.append(f"committed step {step} does not verify ({why})")
    for snapshot in earlier:
        lost = set(snapshot.committed) - set(final.committed)
        if lost:
            problems.append(f"committed step(s) {sorted(lost)} vanished")
    if last_step is not None and last_step not in final.committed:
        problems.append(f"the final step {last_step} was not committed")
    intact = {s: c for s, c in final.committed.items() if s not in final.bad}
    for r in restores:
        before = [s for s, c in intact.items() if c["created"] <= r.t]
        want = max(before, default=None)
        if want is None or r.step != want:
            problems.append(
                f"segment {r.segment} restored step {r.step}, the newest intact "
                f"committed step then was {want}"
            )
    restored_segments = {r.segment for r in restores}
    for seg in resumed_segments:
        if seg not in restored_segments:
            problems.append(f"resumed segment {seg} restored nothing")
    if problems:
        return Check(CHECKPOINTS, False, "; ".join(problems))
    detected = sorted(set(final.bad) & corrupted_on_purpose)
    note = f", damage injected at step(s) {detected} detected" if detected else ""
    rs = f", restores {[r.step for r in restores]} newest intact" if restores else ""
    return Check(CHECKPOINTS, True, f"{len(final.committed)} committed, all intact{note}{rs}")


# -- 4. fencing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitRecord:
    """One version of a ``commits/{step}`` key and the generation current when it was put."""

    job: str
    step: int
    generation: int  # the writer's generation, as it recorded it
    current: int  # ctl/gen of the job at the revision of the put
    revision: int

    @property
    def stale(self) -> bool:
        return self.generation != self.current


def read_commits(client: Any, prefix: str = "/elastic/") -> list[CommitRecord]:
    """Every version of every commit record under ``prefix``, from etcd's MVCC history.

    Each version is read at its own revision together with the job's
    ``ctl/gen`` at that revision: what the fence should have compared.
    """
    out = []
    for _value, meta in client.get_prefix(prefix):
        key = meta.key.decode()
        job, _, rest = key[len(prefix) :].partition("/")
        if not rest.startswith("commits/"):
            continue
        gen_key = f"{prefix}{job}/ctl/gen"
        revision = meta.mod_revision
        while revision >= meta.create_revision:
            kv = client.get_response(key, revision=revision).kvs
            if not kv:
                break
            rec = json.loads(kv[0].value)
            gen_kvs = client.get_response(gen_key, revision=kv[0].mod_revision).kvs
            current = int(gen_kvs[0].value) if gen_kvs else 0
            out.append(
                CommitRecord(
                    job, int(rec["step"]), int(rec["generation"]), current, kv[0].mod_revision
                )
            )
            revision = kv[0].mod_revision - 1
    return sorted(out, key=lambda r: r.revision)


def check_fencing(commits: Sequence[CommitRecord] | None, committed: StoreState) -> Check:
    if commits is None:
        return Check(FENCING, False, "etcd history unavailable: commits cannot be checked")
    problems = [
        f"job {c.job}: commit of step {c.step} by generation {c.generation} accepted while "
        f"generation {c.current} was current"
        for c in commits
        if c.stale
    ]
    fenced = {(c.step, c.generation) for c in commits if not c.stale}
    for step, info in sorted(committed.committed.items()):
        if (step, info["generation"]) not in fenced:
            problems.append(
                f"checkpoint step {step} (generation {info['generation']}) is "
                "committed without a fenced commit record"
            )
    if problems:
        return Check(FENCING, False, "; ".join(problems))
    return Check(FENCING, True, f"{len(commits)} commit(s), each by the current generation")


# -- 5. no hang -------------------------------------------------------------------------------


def check_no_hang(
    ended: bool, wall_s: float, bound_s: float, exit_codes: Sequence[int | None]
) -> Check:
    codes = ", ".join("killed" if c is None else str(c) for c in exit_codes)
    if not ended:
        return Check(
            NO_HANG,
            False,
            f"still running after its bound of {bound_s:.0f}s: "
            f"stopped by the runner (launcher exit codes {codes})",
        )
    return Check(
        NO_HANG,
        True,
        f"ended by itself in {wall_s:.1f}s (bound {bound_s:.0f}s, launcher exit codes {codes})",
    )


# -- scenario expectations ---------------------------------------------------------------------


@dataclass
class Expectations:
    """Scenario-specific checks beyond the five invariants (see scenarios.py)."""

    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, held: bool, detail: str) -> None:
        self.checks.append(Check(name, held, detail))

    @property
    def held(self) -> bool:
        return all(c.held for c in self.checks)
