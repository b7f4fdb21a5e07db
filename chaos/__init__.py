"""Fault injection, seeded scenarios and invariant checks for elastic training.

    elastic chaos list
    elastic chaos run --all --seeds 3 --report chaos-report/
    elastic chaos soak --faults 100 --report chaos-soak/

A fault kind is one registered class (``KINDS``, see ``chaos/kinds.py``); so is
a trigger (``TRIGGERS``, ``chaos/triggers.py``).

Importing ``chaos`` (or its CLI) does not import torch; the names below load
their module on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "INVARIANTS",
    "KINDS",
    "SCENARIOS",
    "TRIGGERS",
    "Check",
    "Fault",
    "FaultKind",
    "FaultPlan",
    "FaultSpec",
    "FaultyFileSystem",
    "RunPlan",
    "Scenario",
    "Schedule",
    "Settings",
    "SoakConfig",
    "StorageFault",
    "Suite",
    "Trigger",
    "add_chaos_parser",
    "run_one",
    "run_soak",
]

_LAZY = {
    "INVARIANTS": "chaos.invariants",
    "Check": "chaos.invariants",
    "Fault": "chaos.faultfs",
    "FaultPlan": "chaos.faultfs",
    "FaultyFileSystem": "chaos.faultfs",
    "FaultSpec": "chaos.spec",
    "FaultKind": "chaos.spec",
    "Trigger": "chaos.spec",
    "KINDS": "chaos.spec",
    "TRIGGERS": "chaos.spec",
    "SoakConfig": "chaos.soak",
    "run_soak": "chaos.soak",
    "StorageFault": "chaos.faults",
    "SCENARIOS": "chaos.scenarios",
    "Scenario": "chaos.scenarios",
    "Schedule": "chaos.scenarios",
    "RunPlan": "chaos.run",
    "Settings": "chaos.run",
    "Suite": "chaos.runner",
    "add_chaos_parser": "chaos.runner",
    "run_one": "chaos.run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chaos' has no attribute {name!r}")
