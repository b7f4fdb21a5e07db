"""Sample ledger: which sample ids each rank trained on, per step and generation.

Each member appends to its own JSONL file before the step's gradient
all-reduce (so a rank that dies after contributing has logged). A step may be
attempted more than once (rolled back and redone); its samples count from the
newest generation that attempted it, which is the attempt whose update
survived.
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass


class LedgerWriter:
    def __init__(self, directory: str, member_id: str, kind: str = "train") -> None:
        # The validation ledger (kind "val") lives beside the training one under
        # its own prefix, so the training check never reads it.
        os.makedirs(directory, exist_ok=True)
        prefix = "ledger" if kind == "train" else f"{kind}ledger"
        self.path = os.path.join(directory, f"{prefix}-{member_id}.jsonl")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(
        self,
        *,
        step: int,
        epoch: int,
        generation: int,
        rank: int,
        world_size: int,
        ids: list[int],
        **more: object,
    ) -> None:
        line = json.dumps(
            {
                "step": step,
                "epoch": epoch,
                "gen": generation,
                "rank": rank,
                "world": world_size,
                "ids": ids,
                **more,
            }
        )
        os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def _records(directory: str, prefix: str) -> Iterator[dict]:
    """Every record of the ledgers ``{prefix}-*.jsonl`` in ``directory``."""
    for path in sorted(glob.glob(os.path.join(directory, f"{prefix}-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed writer


@dataclass(frozen=True)
class LedgerReport:
    steps: int
    epochs: dict[int, int]  # epoch -> samples seen
    missing: dict[int, list[int]]  # epoch -> ids never seen
    duplicated: dict[int, list[int]]  # epoch -> ids seen more than once

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated


def check_ledger(directory: str, dataset_size: int, epochs: list[int]) -> LedgerReport:
    """Check exactly-once consumption for each of ``epochs``."""
    attempts: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rec in _records(directory, "ledger"):
        attempts[rec["step"]][rec["gen"]].append(rec)
    seen: dict[int, list[int]] = defaultdict(list)
    for _step, by_gen in attempts.items():
        newest = by_gen[max(by_gen)]
        for rec in newest:
            seen[rec["epoch"]].extend(rec["ids"])
    missing, duplicated, counts = {}, {}, {}
    for epoch in epochs:
        ids = seen.get(epoch, [])
        counts[epoch] = len(ids)
        tally: dict[int, int] = defaultdict(int)
        for i in ids:
            tally[i] += 1
        miss = [i for i in range(dataset_size) if tally.get(i, 0) == 0]
        dup = sorted(i for i, c in tally.items() if c > 1)
        if miss:
            missing[epoch] = miss
        if dup:
            duplicated[epoch] = dup
    return LedgerReport(len(attempts), counts, missing, duplicated)


@dataclass(frozen=True)
class ValLedgerReport:
    evaluations: dict[int, int]  # step -> ranks that returned metrics
    problems: list[str]  # one line per result not made of each sample exactly once

    @property
    def ok(self) -> bool:
        return not self.problems


def _exactly_once(ids: list[int], dataset_size: int) -> str:
    tally: dict[int, int] = defaultdict(int)
    for i in ids:
        tally[i] += 1
    missing = [i for i in range(dataset_size) if i not in tally]
    dup = sorted(i for i, c in tally.items() if c > 1)
    if not missing and not dup:
        return ""
    return f"{len(missing)} samples missing (first {missing[:5]}), {len(dup)} counted twice"


def check_val_ledger(directory: str, dataset_size: int) -> ValLedgerReport:
    """Check that every evaluation's metrics count each validation sample exactly once.

    A rank's result is made of every rank's ``world`` chunks when the exchange
    succeeded (``result``), or of its own ``world`` chunks and the ones it
    computed ``alone`` after a failure.
    """
    world: dict[tuple[int, int], dict[int, list[int]]] = defaultdict(dict)
    results: list[dict] = []
    for rec in _records(directory, "valledger"):
        if rec["phase"] == "world":
            world[rec["step"], rec["gen"]][rec["rank"]] = rec["ids"]
        else:
            results.append(rec)
    evaluations: dict[int, int] = defaultdict(int)
    problems = []
    for rec in results:
        step, gen, rank = rec["step"], rec["gen"], rec["rank"]
        evaluations[step] += 1
        parts = world.get((step, gen), {})
        if rec["phase"] == "result":
            ids = [i for r in sorted(parts) for i in parts[r]]
        else:
            ids = parts.get(rank, []) + rec["ids"]
        bad = _exactly_once(ids, dataset_size)
        if bad:
            problems.append(f"step {step} gen {gen} rank {rank} ({rec['phase']}): {bad}")
    return ValLedgerReport(dict(evaluations), problems)
