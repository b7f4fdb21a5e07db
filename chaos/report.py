"""The chaos report: ``report.json``, ``report.md`` and a timeline picture per scenario.

The Markdown table has one row per (scenario, seed): faults injected, recovery
seconds, steps redone, invariants held.  Each timeline shows, per seed, the
loss per step next to the reference's, the World size, and where faults fired.
Without matplotlib the pictures are skipped and the report says so.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import defaultdict
from typing import Any

from chaos.invariants import INVARIANTS
from chaos.results import Reference, RunResult


def _stamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def _faults_cell(r: RunResult) -> str:
    fired = [f for f in r.faults if f.get("fired")]
    kinds: dict[str, int] = defaultdict(int)
    for f in fired:
        kinds[f["kind"]] += 1
    parts = [k if n == 1 else f"{k} x{n}" for k, n in kinds.items()]
    storage = r.schedule_json.get("storage", [])
    if storage:
        actions: dict[str, int] = defaultdict(int)
        for f in storage:
            actions[f["action"]] += 1
        parts += [f"storage {a}" + (f" x{n}" if n > 1 else "") for a, n in actions.items()]
    missed = len(r.faults) - len(fired)
    return (", ".join(parts) or "none") + (f" ({missed} not fired)" if missed else "")


def _recovery_cell(r: RunResult) -> str:
    if not r.recovery_s:
        return "-"
    return f"{max(r.recovery_s):.2f}" + (
        f" ({len(r.recovery_s)}x)" if len(r.recovery_s) > 1 else ""
    )


def _held_cell(r: RunResult) -> str:
    if r.error:
        return "error"
    failed = [c.name for c in r.checks if not c.held]
    held = f"{len(r.checks) - len(failed)}/{len(r.checks)}"
    return held if not failed else f"{held} (broken: {', '.join(failed)})"


def summary_table(results: list[RunResult]) -> str:
    lines = [
        "| scenario | seed | faults injected | recovery s (max) | steps redone | "
        "invariants held | expectations | warnings | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        exp_failed = [c.name for c in r.expectations if not c.held]
        exp = "ok" if not exp_failed else "failed: " + ", ".join(dict.fromkeys(exp_failed))
        name = r.name + (f" [break: {', '.join(r.breaks)}]" if r.breaks else "")
        lines.append(
            f"| {name} | {r.seed} | {_faults_cell(r)} | {_recovery_cell(r)} | "
            f"{r.steps_redone} | {_held_cell(r)} | {exp} | {len(r.warnings) or '-'} | "
            f"{'PASS' if r.passed else 'FAIL'} |"
        )
    return "\n".join(lines)


def write(
    report_dir: str,
    results: list[RunResult],
    references: dict[str, Reference],
    *,
    command: str,
    started: float,
) -> dict[str, Any]:
    os.makedirs(report_dir, exist_ok=True)
    pictures, note = timelines(report_dir, results, references)
    passed = sum(r.passed for r in results)
    doc = {
        "generated": _stamp(datetime.datetime.now().timestamp()),
        "started": _stamp(started),
        "command": command,
        "summary": {
            "runs": len(results),
            "passed": passed,
            "failed": len(results) - passed,
            "all_invariants_held": all(r.invariants_held for r in results),
            "invariants": list(INVARIANTS),
        },
        "references": {
            key: {
                "run_dir": ref.result.run_dir,
                "wall_s": round(ref.result.wall_s, 2),
                "final_loss": ref.losses.get(ref.config.total_steps),
                "losses": ref.losses,
                "checks": [c.to_json() for c in ref.result.checks],
            }
            for key, ref in references.items()
        },
        "runs": [r.to_json() for r in results],
        "timelines": pictures,
        "timeline_note": note,
    }
    _atomic_write(os.path.join(report_dir, "report.json"), json.dumps(doc, indent=2, default=str))
    _atomic_write(os.path.join(report_dir, "report.md"), markdown(doc, results, pictures, note))
    return doc


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(
    doc: dict[str, Any], results: list[RunResult], pictures: dict[str, str], note: str | None
) -> str:
    s = doc["summary"]
    out = [
        "# Chaos report",
        "",
        f"- generated: {doc['generated']} (started {doc['started']})",
        f"- command: `{doc['command']}`",
        f"- runs: {s['runs']}, passed: {s['passed']}, failed: {s['failed']}",
        f"- every invariant held: {'yes' if s['all_invariants_held'] else 'NO'}",
        "",
        "Invariants: 1 `params` (final parameters equal the failure-free reference), "
        "2 `exactly-once` (sample ledger), 3 `checkpoints` (none lost, torn or corrupt; "
        "restores load the newest intact step), 4 `fencing` (no commit from a stale "
        "generation), 5 `no-hang` (each run ends within its bound).",
        "",
        summary_table(results),
        "",
    ]
    bad = [r for r in results if not r.passed]
    if bad:
        out += ["## What failed", ""]
        for r in bad:
            out.append(
                f"### {r.name} seed {r.seed}"
                + (f" (break: {', '.join(r.breaks)})" if r.breaks else "")
            )
            if r.error:
                out.append(f"- run error: {r.error}")
            for c in r.checks + r.expectations:
                if not c.held:
                    out.append(f"- `{c.name}`: {c.detail}")
            out.append(f"- schedule: {'; '.join(r.schedule) or 'none'}")
            out.append(f"- artifacts: `{r.run_dir}`")
            out.append("")
    warned = [r for r in results if r.warnings]
    if warned:
        out += ["## Warnings (no invariant broken)", ""]
        for r in warned:
            out += [f"- {r.name} seed {r.seed}: {w}" for w in r.warnings]
        out.append("")
    out += ["## Runs", ""]
    for r in results:
        out.append(
            f"- **{r.name} seed {r.seed}**: {'; '.join(r.schedule) or 'no faults'} — "
            + "; ".join(f"{c.name}: {c.detail}" for c in r.checks)
        )
    out.append("")
    if pictures:
        out += ["## Timelines", ""]
        for name, path in sorted(pictures.items()):
            out.append(f"![{name}]({os.path.basename(path)})")
        out.append("")
    if note:
        out += [f"_Timelines: {note}_", ""]
    return "\n".join(out)


def timelines(
    report_dir: str, results: list[RunResult], references: dict[str, Reference]
) -> tuple[dict[str, str], str | None]:
    """One PNG per scenario, one row per run of it; (pictures, note if skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "matplotlib is not installed: no timeline pictures"
    by_scenario: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_scenario[r.name].append(r)
    pictures = {}
    for name, runs in by_scenario.items():
        fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs)), squeeze=False)
        for ax, r in zip(axes[:, 0], runs, strict=True):
            ref = references.get(r.config_key)
            _plot_run(ax, r, ref)
        fig.tight_layout()
        path = os.path.join(report_dir, f"timeline-{name}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        pictures[name] = path
    return pictures, None


def _mark(
    ax: Any, step: int, label: str, color: str, ls: str, *, top: bool, line: str | None = None
) -> None:
    """A vertical line at ``step`` (in ``line``, default ``color``) labelled at the
    top or the bottom of the plot."""
    ax.axvline(step, color=line or color, ls=ls, lw=1)
    ax.annotate(
        label,
        (step, 1 if top else 0),
        xycoords=("data", "axes fraction"),
        rotation=90,
        va="top" if top else "bottom",
        ha="right",
        fontsize=7,
        color=color,
    )


def _plot_run(ax: Any, r: RunResult, ref: Reference | None) -> None:
    steps = r.timeline["steps"]
    if ref is not None and ref.losses:
        xs = sorted(ref.losses)
        ax.plot(xs, [ref.losses[x] for x in xs], color="0.6", lw=3, label="reference loss")
    segs = sorted({s["seg"] for s in steps})
    for seg in segs:
        pts = [s for s in steps if s["seg"] == seg]
        ax.plot(
            [p["step"] for p in pts],
            [p["loss"] for p in pts],
            ".-",
            ms=3,
            lw=1,
            label="loss" if seg == 0 else f"loss after resume {seg}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    world = ax.twinx()
    for seg in segs:
        pts = [s for s in steps if s["seg"] == seg]
        world.step(
            [p["step"] for p in pts],
            [p["world"] for p in pts],
            where="post",
            color="tab:green",
            alpha=0.6,
            lw=1.5,
        )
    world.set_ylabel("world size", color="tab:green")
    world.set_ylim(0, max([p["world"] for p in steps] + [1]) + 1)
    for f in r.schedule_json.get("storage", []):
        if f.get("step") is not None:
            _mark(ax, f["step"], f"storage {f['action']}", "tab:orange", ":", top=False)
    for f in r.timeline["faults"]:
        if f.get("step") is not None:
            line = "tab:red" if f["fired"] else "0.8"
            _mark(ax, f["step"], f["kind"], "tab:red", "--", top=True, line=line)
    verdict = "PASS" if r.passed else "FAIL"
    ax.set_title(
        f"{r.name} seed {r.seed}: {verdict}"
        + (f" (break: {', '.join(r.breaks)})" if r.breaks else ""),
        fontsize=9,
    )
    ax.legend(loc="lower left", fontsize=7)
