"""The full matrix: every scenario x 3 seeds (slow: `pytest -m slow tests/chaos`).

The same matrix from the command line, with a report (``--hosts 3`` adds the
scenarios that need a test bed of hosts, and puts every launcher on one):
``elastic chaos run --all --seeds 3 --hosts 3 --report chaos-report/``.
"""

from __future__ import annotations

import pytest

from chaos import scenarios as sc
from chaos.run import RunPlan
from tests.chaos.conftest import explain, run_plan

SEEDS = (0, 1, 2)
# Scenarios that expose a runtime bug not fixed yet; strict, so a fix is noticed.
KNOWN_RUNTIME_BUGS = {
    "checkpoint-on-last-step": "the periodic save of the last step and the final save "
    "collide (CheckpointExistsError): rank 0 crash-loops",
}


def _cases() -> list:
    cases = []
    for name, scenario in sc.SCENARIOS.items():
        if scenario.needs_hosts:
            continue  # on a test bed: tests/multihost/test_chaos_hosts.py
        marks = [pytest.mark.slow]
        if name in KNOWN_RUNTIME_BUGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_RUNTIME_BUGS[name], strict=True))
        cases += [pytest.param(name, seed, marks=marks, id=f"{name}-s{seed}") for seed in SEEDS]
    return cases


@pytest.mark.parametrize(("name", "seed"), _cases())
def test_scenario_keeps_every_invariant(name: str, seed: int, chaos_reference, tmp_path) -> None:
    scenario = sc.get(name)
    result = run_plan(
        RunPlan(name, seed, scenario, scenario.schedule(seed)),
        chaos_reference,
        str(tmp_path / "run"),
    )
    assert result.passed, explain(result)
