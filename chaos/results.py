"""What one chaos run produced (:class:`RunResult`) and the failure-free reference.

Kept apart from the runner so that the report reads results without
importing the runner (which writes the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chaos import invariants as inv
from chaos.scenarios import TrainConfig


@dataclass
class Reference:
    config: TrainConfig
    params: dict[str, Any]
    losses: dict[int, float]
    result: RunResult


@dataclass
class RunResult:
    name: str  # scenario name, or "reference"
    seed: int | None
    breaks: tuple[str, ...]
    schedule: list[str]
    schedule_json: dict[str, Any]
    faults: list[dict[str, Any]]
    checks: list[inv.Check]
    expectations: list[inv.Check]
    recovery_s: list[float]
    steps_redone: int
    wall_s: float
    bound_s: float
    exit_codes: list[int | None]
    run_dir: str
    timeline: dict[str, Any]
    config_key: str
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # anomalies that break no invariant

    @property
    def invariants_held(self) -> bool:
        return self.error is None and all(c.held for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.invariants_held and all(c.held for c in self.expectations)

    def check(self, name: str) -> inv.Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.name,
            "seed": self.seed,
            "breaks": list(self.breaks),
            "passed": self.passed,
            "invariants_held": self.invariants_held,
            "schedule": self.schedule,
            "schedule_spec": self.schedule_json,
            "faults": self.faults,
            "invariants": [c.to_json() for c in self.checks],
            "expectations": [c.to_json() for c in self.expectations],
            "recovery_s": self.recovery_s,
            "steps_redone": self.steps_redone,
            "wall_s": round(self.wall_s, 2),
            "bound_s": self.bound_s,
            "launcher_exit_codes": self.exit_codes,
            "run_dir": self.run_dir,
            "config": self.config_key,
            "error": self.error,
            "warnings": self.warnings,
            "timeline": self.timeline,
        }
