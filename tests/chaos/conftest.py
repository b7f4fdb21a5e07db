"""Shared fixtures of the chaos tests: process hygiene and one reference run per session."""

from __future__ import annotations

import os

import pytest

from chaos import scenarios as sc
from chaos.run import Reference, RunPlan, RunResult, Settings, run_one, run_reference
from tests.elastic.conftest import no_leftover_processes

__all__ = ["no_leftover_processes"]

# Slow or shared machines: CHAOS_TIMEOUT_SCALE=2 doubles every run's bound.
SETTINGS = Settings(timeout_scale=float(os.environ.get("CHAOS_TIMEOUT_SCALE", "1")))


@pytest.fixture(scope="session")
def chaos_reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The failure-free reference of the default training configuration."""
    return run_reference(sc.TrainConfig(), SETTINGS, str(tmp_path_factory.mktemp("chaos-ref")))


def explain(result: RunResult) -> str:
    failed = [f"{c.name}: {c.detail}" for c in result.checks + result.expectations if not c.held]
    return (
        f"{result.name} seed {result.seed} (schedule: {result.schedule}; faults: "
        f"{result.faults}; error: {result.error}; artifacts: {result.run_dir}): "
        + " | ".join(failed)
    )


def run_plan(plan: RunPlan, reference: Reference, run_dir: str) -> RunResult:
    return run_one(plan, SETTINGS, run_dir, reference)
