"""Plain result types returned by the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storage.manifest import Manifest
from storage.reader import FileProblem


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as listed: committed=False only for a non-committing rank's own part."""

    step: int
    generation: int
    world_size: int
    url: str  # the step directory
    created: float  # unix time of the commit
    num_files: int
    total_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    committed: bool = True

    @classmethod
    def from_manifest(cls, m: Manifest, url: str) -> CheckpointInfo:
        return cls(
            step=m.step,
            generation=m.generation,
            world_size=m.world_size,
            url=url,
            created=m.created,
            num_files=len(m.files),
            total_bytes=m.total_bytes,
            metadata=dict(m.metadata),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "generation": self.generation,
            "world_size": self.world_size,
            "url": self.url,
            "created": self.created,
            "num_files": self.num_files,
            "total_bytes": self.total_bytes,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint: replicated state plus the per-rank state of every saved rank."""

    step: int
    state: dict[str, Any]
    per_rank: dict[int, dict[str, Any]]
    generation: int
    world_size: int
    metadata: dict[str, Any]


@dataclass(frozen=True)
class StepReport:
    step: int
    problems: tuple[FileProblem, ...] = ()
    signature: str = ""  # "unsigned", "signed", "bad signature", ... ("" if unknown)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of `verify`: one entry per committed step checked."""

    url: str
    steps: tuple[StepReport, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def problems(self) -> list[FileProblem]:
        return [p for s in self.steps for p in s.problems]

    @property
    def bad_steps(self) -> list[int]:
        return [s.step for s in self.steps if not s.ok]
