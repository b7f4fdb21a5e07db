"""Fault injection, seeded scenarios and invariant checks for elastic training.

    elastic chaos list
    elastic chaos run --all --seeds 3 --report chaos-report/

Importing ``chaos`` (or its CLI) does not import torch; the names below load
their module on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "INVARIANTS",
    "SCENARIOS",
    "Check",
    "Fault",
    "FaultPlan",
    "FaultSpec",
    "FaultyFileSystem",
    "RunPlan",
    "Scenario",
    "Schedule",
    "Settings",
    "StorageFault",
    "Suite",
    "add_chaos_parser",
    "run_one",
]

_LAZY = {
    "INVARIANTS": "chaos.invariants",
    "Check": "chaos.invariants",
    "Fault": "chaos.faultfs",
    "FaultPlan": "chaos.faultfs",
    "FaultyFileSystem": "chaos.faultfs",
    "FaultSpec": "chaos.faults",
    "StorageFault": "chaos.faults",
    "SCENARIOS": "chaos.scenarios",
    "Scenario": "chaos.scenarios",
    "Schedule": "chaos.scenarios",
    "RunPlan": "chaos.runner",
    "Settings": "chaos.runner",
    "Suite": "chaos.runner",
    "add_chaos_parser": "chaos.runner",
    "run_one": "chaos.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chaos' has no attribute {name!r}")
