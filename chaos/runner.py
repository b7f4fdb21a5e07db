"""``elastic chaos``: run fault scenarios as real processes, check invariants, report.

Each (scenario, seed) is one :class:`chaos.run.Run`; a failure-free reference
run per training configuration comes first.  ``elastic chaos soak`` is one long
run under random faults (``chaos/soak.py``).

Exit code of ``elastic chaos run``: 0 when every invariant and expectation of
every run held, 1 otherwise, 2 for bad arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos import invariants as inv
from chaos import report
from chaos import scenarios as sc
from chaos.faults import BREAKS
from chaos.hosts import Hosts, chaos_argv, run_on_bed
from chaos.run import (
    EXIT_OK,
    EXIT_VIOLATION,
    Reference,
    RunPlan,
    RunResult,
    Settings,
    check_report_dir,
    guarded,
    run_one,
    run_reference,
)
from chaos.soak import add_soak_parser
from chaos.spec import KINDS
from elastic.base.exitcodes import EXIT_USAGE
from elastic.launch import argtypes

# One run and its parts are chaos.run's (RunPlan, Settings, run_one, ...); this is the suite.
__all__ = ["Suite", "add_chaos_parser"]


# -- the suite ----------------------------------------------------------------------------------


@dataclass
class Suite:
    scenarios: list[sc.Scenario]
    seeds: list[int]
    report_dir: str
    settings: Settings = field(default_factory=Settings)
    breaks: tuple[str, ...] = ()
    command: str = ""
    progress: Callable[[str], None] = field(default=lambda line: None)
    references: dict[str, Reference] = field(default_factory=dict)  # computed if missing

    def run(self) -> tuple[list[RunResult], dict[str, Reference]]:
        started = time.time()
        references = dict(self.references)
        results: list[RunResult] = []
        runs_dir = os.path.join(self.report_dir, "runs")
        for config in {s.train.key: s.train for s in self.scenarios}.values():
            if config.key in references:
                continue
            self.progress(f"reference run for {config.key} ...")
            ref = run_reference(config, self.settings, runs_dir)
            references[config.key] = ref
            self.progress(
                f"reference: {ref.result.wall_s:.1f}s, final loss "
                f"{ref.losses.get(config.total_steps, float('nan')):.4g}"
            )
        for scenario in self.scenarios:
            for seed in self.seeds:
                plan = RunPlan(
                    scenario.name, seed, scenario, scenario.schedule(seed), breaks=self.breaks
                )
                suffix = "-broken-" + "-".join(self.breaks) if self.breaks else ""
                run_dir = os.path.join(runs_dir, f"{scenario.name}-s{seed}{suffix}")
                result = run_one(plan, self.settings, run_dir, references[scenario.train.key])
                results.append(result)
                self.progress(_progress_line(result))
                report.write(
                    self.report_dir, results, references, command=self.command, started=started
                )
        report.write(self.report_dir, results, references, command=self.command, started=started)
        return results, references


def _progress_line(r: RunResult) -> str:
    held = sum(c.held for c in r.checks)
    bad = [c.name for c in r.checks + r.expectations if not c.held]
    verdict = "PASS" if r.passed else "FAIL"
    return (
        f"{r.name} seed {r.seed}: {verdict} ({held}/{len(r.checks)} invariants, "
        f"{r.wall_s:.1f}s)"
        + (f" failed: {', '.join(bad)}" if bad else "")
        + (f" error: {r.error}" if r.error else "")
    )


# -- command line ---------------------------------------------------------------------------------


# One set of value types for every command (NaN and infinities refused).
_positive_int = argtypes.count
_positive_float = argtypes.positive


def add_chaos_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chaos",
        help="fault-injection suite: run scenarios, check invariants, report",
        description="Run seeded fault scenarios against real elastic jobs and check that "
        "training stays correct.",
    )
    sub = p.add_subparsers(dest="chaos_command", required=True, metavar="ACTION")

    lp = sub.add_parser(
        "list", help="list the scenarios (and their schedules for a seed), or the fault kinds"
    )
    lp.add_argument(
        "--seed",
        type=int,
        default=None,
        help="also print each scenario's fault schedule for this seed",
    )
    lp.add_argument(
        "--kinds",
        action="store_true",
        help="list the fault kinds instead: what each does and expects of the run",
    )
    lp.add_argument("--json", action="store_true", help="machine-readable output")
    lp.set_defaults(func=cmd_list)

    rp = sub.add_parser(
        "run",
        help="run scenarios and write a report",
        description="Exit 0 only if every invariant of every run held.",
    )
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="a scenario to run (repeatable); see `elastic chaos list`",
    )
    which.add_argument("--all", action="store_true", help="every scenario")
    which.add_argument("--smoke", action="store_true", help="the quick smoke subset")
    rp.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run seeds FIRST..FIRST+N-1 of each scenario (default 1)",
    )
    rp.add_argument("--first-seed", type=int, default=0, metavar="FIRST")
    rp.add_argument(
        "--report",
        default="chaos-report",
        metavar="DIR",
        help="report directory (default ./chaos-report)",
    )
    rp.add_argument(
        "--checkpoint-base",
        default=None,
        metavar="URL",
        help="fsspec URL under which each run gets its own checkpoint location "
        "(default: file:// inside the report directory)",
    )
    rp.add_argument("--lease-ttl", type=_positive_float, default=2.0, metavar="S")
    rp.add_argument("--collective-timeout", type=_positive_float, default=4.0, metavar="S")
    rp.add_argument(
        "--timeout-scale",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="multiply every run's time bound (slow machines)",
    )
    rp.add_argument(
        "--tolerance",
        type=_positive_float,
        default=inv.DEFAULT_TOLERANCE,
        help="largest allowed |parameter difference| to the reference (1e-5)",
    )
    rp.add_argument("--etcd-binary", default=None, metavar="PATH")
    rp.add_argument(
        "--hosts",
        type=_hosts,
        default=None,
        metavar="N",
        help="put the launchers on N hosts of a network test bed (namespaces on "
        "a private bridge; root only): needed by the scenarios that cut a "
        "host's link",
    )
    rp.add_argument(
        "--break",
        dest="breaks",
        action="append",
        default=[],
        choices=BREAKS,
        help="plug a deliberately broken component into every run (shows that the checks catch it)",
    )
    rp.set_defaults(func=cmd_run)
    add_soak_parser(sub, _positive_int, _positive_float)


def _hosts(text: str) -> int:
    n = argtypes.count(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"needs 2 or more hosts, got {n}")
    return n


def _error(message: str) -> int:
    print(f"elastic chaos: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_list(args: argparse.Namespace) -> int:
    if args.kinds:
        return _list_kinds(args.json)
    rows = []
    for s in sc.SCENARIOS.values():
        row: dict[str, Any] = {
            "name": s.name,
            "summary": s.summary,
            "workers": s.workers,
            "smoke": s.smoke,
            "bound_s": s.bound_s,
            "needs_hosts": s.needs_hosts,
        }
        if args.seed is not None:
            row["schedule"] = s.schedule(args.seed).describe()
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        flag = (" [smoke]" if r["smoke"] else "") + (" [--hosts]" if r["needs_hosts"] else "")
        print(f"{r['name']:<{width}}  {r['summary']}{flag}")
        for line in r.get("schedule", ()):
            print(f"{'':<{width}}    - {line}")
    return EXIT_OK


def _list_kinds(as_json: bool) -> int:
    """Every registered fault kind, from its class (``chaos/kinds.py``): adding a kind
    adds its line here, with nothing else to update."""
    kinds = [k.to_json() for k in KINDS.values()]
    if as_json:
        print(json.dumps(kinds, indent=2))
        return EXIT_OK
    width = max(len(k["name"]) for k in kinds)
    for k in kinds:
        needs = [w for w, on in (("rank", k["needs_rank"]), ("duration", k["duration"])) if on]
        print(f"{k['name']:<{width}}  {k['summary']}" + (f" [{', '.join(needs)}]" if needs else ""))
        if k["duration"]:
            print(f"{'':<{width}}    duration: {k['duration']}")
        if k["expects"]:
            print(f"{'':<{width}}    expects: {k['expects']}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if args.all:
        chosen = list(sc.SCENARIOS.values())
    elif args.smoke:
        chosen = sc.smoke()
    else:
        unknown = [n for n in args.scenario if n not in sc.SCENARIOS]
        if unknown:
            return _error(f"unknown scenario {unknown[0]!r}; known: {', '.join(sc.SCENARIOS)}")
        chosen = [sc.SCENARIOS[n] for n in dict.fromkeys(args.scenario)]
        bedless = [s.name for s in chosen if s.needs_hosts and not args.hosts]
        if bedless:
            return _error(f"scenario {bedless[0]!r} cuts a host's link: run it with --hosts N")
    problem = check_report_dir(args.report)
    if problem:
        return _error(problem)
    bed = Hosts.from_env()
    if args.hosts and bed is None:
        # This process builds the bed and runs the suite again inside it.
        return run_on_bed(args.hosts, chaos_argv(getattr(args, "raw_argv", None) or sys.argv[1:]))
    if not args.hosts:
        skipped = [s.name for s in chosen if s.needs_hosts]
        if skipped:
            print(f"[chaos] skipping {', '.join(skipped)}: needs --hosts N", file=sys.stderr)
        chosen = [s for s in chosen if not s.needs_hosts]
    settings = Settings(
        lease_ttl=args.lease_ttl,
        collective_timeout=args.collective_timeout,
        timeout_scale=args.timeout_scale,
        checkpoint_base=args.checkpoint_base,
        etcd_binary=args.etcd_binary,
        tolerance=args.tolerance,
        hosts=bed if args.hosts else None,
    )
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = "elastic " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["chaos"] else ""
    suite = Suite(
        chosen,
        seeds,
        args.report,
        settings,
        tuple(args.breaks),
        command=command or f"elastic chaos run ({len(chosen)} scenario(s))",
        progress=lambda line: print(f"[chaos] {line}", file=sys.stderr, flush=True),
    )

    def work() -> int:
        results, _ = suite.run()
        failed = [r for r in results if not r.passed]
        print(
            f"[chaos] {len(results) - len(failed)}/{len(results)} run(s) passed; report in "
            f"{os.path.join(args.report, 'report.md')}",
            file=sys.stderr,
        )
        return EXIT_OK if not failed else EXIT_VIOLATION

    return guarded("elastic chaos", work)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chaos.runner ...`` = ``elastic chaos ...``."""
    parser = argparse.ArgumentParser(prog="elastic")
    add_chaos_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
