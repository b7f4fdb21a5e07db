"""The smoke subset: real jobs under faults, every invariant held, a report written."""

from __future__ import annotations

import json
import os

from chaos import scenarios as sc
from chaos.invariants import INVARIANTS
from chaos.runner import Suite
from tests.chaos.conftest import SETTINGS, explain


def test_smoke_scenarios_keep_every_invariant_and_report_it(chaos_reference, tmp_path) -> None:
    smoke = sc.smoke()
    suite = Suite(
        smoke,
        [0],
        str(tmp_path / "report"),
        SETTINGS,
        references={chaos_reference.config.key: chaos_reference},
    )
    results, _ = suite.run()

    failed = [explain(r) for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    assert [r.name for r in results] == [s.name for s in smoke]
    for r in results:
        assert [c.name for c in r.checks] == list(INVARIANTS)
        assert all(f["fired"] for f in r.faults), r.faults

    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["summary"] == {
        "runs": len(smoke),
        "passed": len(smoke),
        "failed": 0,
        "all_invariants_held": True,
        "invariants": list(INVARIANTS),
    }
    md = (tmp_path / "report" / "report.md").read_text()
    for s in smoke:
        assert f"| {s.name} | 0 |" in md
        assert os.path.getsize(tmp_path / "report" / f"timeline-{s.name}.png") > 0
