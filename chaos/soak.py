"""``elastic chaos soak``: one long training run under a random fault every few seconds.

The run trains for ``(faults + 1) * every_steps`` steps (``every_steps`` is
``--every`` seconds at the step time) plus a tail of about 30 s (so that
workers started by the last faults join before the end), on two launchers
(hosts) to begin with.  At each multiple of ``every_steps`` the soak draws a
fault kind (seeded) from kill, freeze, hang, leave, join and kill-host, given
the job as it is then: it keeps the number of live workers (in the World or
starting up) between ``max(2, W - 1)`` and ``W + 2`` (a join when it got low, no
leave or kill-host at the low mark, no join at the high mark), aims worker
faults at a rank of the current World, and kills a host only while another
launcher runs.  Each fault waits for the one before it and for its step, so
all of them fire before training ends, and the run's time bound stops
everything in any case.  At the end: the five
invariants (against a failure-free reference of the same training), each
fault kind's expectation, and a report (``soak.json``, ``soak.md`` next to the
usual ``report.md``).

Every launcher gets ``--max-restarts faults + 10``: restarts are counted per
launcher, and a kill or a hang costs its launcher one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from chaos import report
from chaos import scenarios as sc
from chaos.run import (
    EXIT_OK,
    EXIT_VIOLATION,
    POLL_S,
    Run,
    RunPlan,
    RunResult,
    Settings,
    check_report_dir,
    guarded,
    run_one,
    run_reference,
)
from chaos.spec import KINDS, FaultSpec
from elastic.base.exitcodes import EXIT_USAGE

SOAK_KINDS = ("kill-worker", "freeze-worker", "hang-worker", "leave", "join", "kill-host")
REMOVES = ("leave", "kill-host")  # faults after which nobody replaces the victims
COLLECTIVE_TIMEOUT = 60.0  # far above the lease TTL: a frozen peer is found by its lease
FREEZE_LONGEST_S = 30.0
TAIL_S = 30.0  # training after the last fault, at the nominal step time


@dataclass(frozen=True)
class SoakConfig:
    faults: int
    seed: int = 0
    every_s: float = 3.0
    workers: int = 3
    step_time: float = 0.05
    launchers: int = 2
    kinds: tuple[str, ...] = SOAK_KINDS

    def __post_init__(self) -> None:
        if self.faults < 1:
            raise ValueError(f"--faults must be >= 1, got {self.faults}")
        if not self.every_s > 0 or not self.step_time > 0:
            raise ValueError(
                f"--every and --step-time must be > 0, got {self.every_s} and {self.step_time}"
            )
        if self.workers < 2:
            raise ValueError(f"--workers must be >= 2 (a soak removes workers), got {self.workers}")
        if not 1 <= self.launchers <= self.workers:
            raise ValueError(f"launchers must be in 1..{self.workers}, got {self.launchers}")
        for kind in self.kinds:
            KINDS[kind]  # raises on an unknown name

    @property
    def every_steps(self) -> int:
        return max(5, math.ceil(self.every_s / self.step_time))

    @property
    def low(self) -> int:
        return max(2, self.workers - 1)

    @property
    def high(self) -> int:
        return self.workers + 2

    @property
    def train(self) -> sc.TrainConfig:
        base = sc.TrainConfig()
        steps = (self.faults + 1) * self.every_steps + math.ceil(TAIL_S / self.step_time)
        return replace(base, epochs=max(1, math.ceil(steps / base.steps_per_epoch)))

    @property
    def bound_s(self) -> float:
        """Generous: every step at four times its nominal time plus 30 s per fault."""
        return round(
            120.0 + self.train.total_steps * (4 * self.step_time + 0.05) + 30.0 * self.faults, 1
        )

    def scenario(self) -> sc.Scenario:
        return sc.Scenario(
            "soak",
            f"{self.faults} random faults, one every {self.every_s:g}s of training",
            lambda rng, shape: sc.Schedule(),
            workers=self.workers,
            step_time=self.step_time,
            checkpoint_every=5 * self.every_steps,
            train=self.train,
            bound_s=self.bound_s,
            launchers=self.launchers,
            collective_timeout=COLLECTIVE_TIMEOUT,
        )


class Soak(Run):
    """A :class:`~chaos.run.Run` whose faults are drawn one by one as the job goes."""

    def __init__(self, plan: RunPlan, settings: Settings, run_dir: str, config: SoakConfig) -> None:
        super().__init__(plan, settings, run_dir)
        self.config = config
        self.rng = random.Random(f"soak:{config.seed}")

    def _specs(self) -> Iterator[FaultSpec]:
        cfg = self.config
        for i in range(1, cfg.faults + 1):
            at = i * cfg.every_steps
            if not self._reach(at):
                return  # the run ended or its bound passed: the rest are not drawn
            yield self._draw(at)

    def _reach(self, step: int) -> bool:
        while time.monotonic() < self.deadline and self._launchers_running():
            self.poll()
            if (self._last_step() or 0) >= step:
                return True
            time.sleep(POLL_S)
        return False

    def _draw(self, at: int) -> FaultSpec:
        world = len(self.world()) or self.config.workers
        return draw(
            self.rng,
            self.config,
            at,
            live=max(world, len(self.live_workers())),
            world=world,
            hosts=len(self.launchers_running()),
        )


def draw(
    rng: random.Random, cfg: SoakConfig, at: int, live: int, world: int, hosts: int
) -> FaultSpec:
    """The next fault for ``live`` workers (``world`` of them in the World) on ``hosts``
    running launchers."""
    # Removals count the World as well as the live workers: workers still
    # starting may never arrive (the 1200-fault soak removed its last worker
    # while two joiners were counted), and a fault only a peer can find needs a
    # World with a peer in it.
    size = live
    allowed = [
        k
        for k in cfg.kinds
        if not (k in REMOVES and min(size, world) <= cfg.low)
        and not (k == "kill-host" and hosts < 2)
        and not (k == "join" and size >= cfg.high)
        and not (KINDS[k].needs_peer and world < 2)
    ]
    if (size < cfg.low and "join" in cfg.kinds) or not allowed:
        allowed = ["join"]
    kind = rng.choice(allowed)
    if kind == "join":
        return FaultSpec(kind, at, count=max(1, min(2, cfg.workers - size)))
    duration = FREEZE_LONGEST_S if kind == "freeze-worker" else 0.0
    return FaultSpec(kind, at, rank=rng.randrange(world), duration_s=duration)


def run_soak(
    config: SoakConfig, settings: Settings, report_dir: str, progress: Any = lambda line: None
) -> tuple[RunResult, dict[str, Any]]:
    """Reference, soak, reports; returns the soak's result and its summary."""
    started = time.time()
    settings = replace(settings, max_restarts=config.faults + 10)
    scenario = config.scenario()
    runs = os.path.join(report_dir, "runs")
    progress(f"reference run: {config.train.total_steps} steps ...")
    ref = run_reference(config.train, settings, runs)
    progress(
        f"reference: {ref.result.wall_s:.1f}s; soak: {config.faults} fault(s), bound "
        f"{scenario.bound_s:.0f}s ..."
    )
    plan = RunPlan("soak", config.seed, scenario, sc.Schedule(), step_time=config.step_time)
    result = run_one(
        plan,
        settings,
        os.path.join(runs, f"soak-s{config.seed}"),
        ref,
        make=lambda p, s, d: Soak(p, s, d, config),
    )
    summary = summarize(config, result)
    report.write(
        report_dir, [result], {config.train.key: ref}, command=_command(config), started=started
    )
    _write(report_dir, summary)
    return result, summary


def summarize(config: SoakConfig, result: RunResult) -> dict[str, Any]:
    fired = Counter(f["kind"] for f in result.faults if f.get("fired"))
    missed = Counter(f["kind"] for f in result.faults if not f.get("fired"))
    rec = result.recovery_s
    return {
        "passed": result.passed,
        "invariants_held": result.invariants_held,
        "error": result.error,
        "faults_requested": config.faults,
        "faults_fired": sum(fired.values()),
        "fired_per_kind": dict(sorted(fired.items())),
        "not_fired_per_kind": dict(sorted(missed.items())),
        "recoveries": {
            "count": len(rec),
            "median_s": round(statistics.median(rec), 3) if rec else None,
            "max_s": round(max(rec), 3) if rec else None,
        },
        "steps": config.train.total_steps,
        "steps_redone": result.steps_redone,
        "invariants": [c.to_json() for c in result.checks],
        "expectations_failed": [c.to_json() for c in result.expectations if not c.held],
        "wall_s": round(result.wall_s, 1),
        "bound_s": result.bound_s,
        "config": {
            "faults": config.faults,
            "seed": config.seed,
            "every_s": config.every_s,
            "every_steps": config.every_steps,
            "workers": config.workers,
            "step_time": config.step_time,
            "launchers": config.launchers,
        },
        "run_dir": result.run_dir,
    }


def _command(config: SoakConfig) -> str:
    return (
        f"elastic chaos soak --faults {config.faults} --seed {config.seed} "
        f"--every {config.every_s:g} --workers {config.workers}"
    )


def _write(report_dir: str, summary: dict[str, Any]) -> None:
    with open(os.path.join(report_dir, "soak.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    rec = summary["recoveries"]
    lines = [
        "# Soak",
        "",
        f"- verdict: {'PASS' if summary['passed'] else 'FAIL'}"
        + (f" (error: {summary['error']})" if summary["error"] else ""),
        f"- faults fired: {summary['faults_fired']} of {summary['faults_requested']}: "
        + (", ".join(f"{k} {n}" for k, n in summary["fired_per_kind"].items()) or "none"),
        f"- recoveries: {rec['count']}, median {rec['median_s']} s, max {rec['max_s']} s",
        f"- steps: {summary['steps']}, redone: {summary['steps_redone']}; wall "
        f"{summary['wall_s']} s (bound {summary['bound_s']} s)",
        "",
        "| invariant | held | detail |",
        "|---|---|---|",
        *(
            f"| {c['name']} | {'yes' if c['held'] else 'NO'} | {c['detail']} |"
            for c in summary["invariants"]
        ),
        "",
    ]
    if summary["expectations_failed"]:
        lines += [
            "## Expectations not met",
            "",
            *(f"- `{c['name']}`: {c['detail']}" for c in summary["expectations_failed"]),
            "",
        ]
    lines += ["Per-run details and the timeline: [report.md](report.md).", ""]
    with open(os.path.join(report_dir, "soak.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# -- command line ---------------------------------------------------------------------------


def add_soak_parser(sub: Any, positive_int: Any, positive_float: Any) -> None:
    p = sub.add_parser(
        "soak",
        help="one long run under a random fault every few seconds",
        description="Exit 0 only if every invariant and expectation held.",
    )
    p.add_argument(
        "--faults", type=positive_int, required=True, metavar="N", help="how many faults to inject"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument(
        "--every",
        type=positive_float,
        default=3.0,
        metavar="S",
        help="seconds of training between faults (default 3)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=3,
        metavar="W",
        help="workers at the start, over two launchers (default 3, at least 2)",
    )
    p.add_argument(
        "--step-time",
        type=positive_float,
        default=0.05,
        metavar="S",
        help="simulated compute per step (default 0.05)",
    )
    p.add_argument(
        "--report",
        default="chaos-soak",
        metavar="DIR",
        help="report directory (default ./chaos-soak)",
    )
    p.add_argument("--lease-ttl", type=positive_float, default=2.0, metavar="S")
    p.add_argument("--etcd-binary", default=None, metavar="PATH")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: argparse.Namespace) -> int:
    try:
        config = SoakConfig(
            args.faults,
            seed=args.seed,
            every_s=args.every,
            workers=args.workers,
            step_time=args.step_time,
            launchers=min(2, args.workers),
        )
    except ValueError as exc:
        print(f"elastic chaos soak: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = check_report_dir(args.report)
    if problem:
        print(f"elastic chaos soak: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = Settings(lease_ttl=args.lease_ttl, etcd_binary=args.etcd_binary)

    def work() -> int:
        result, summary = run_soak(
            config,
            settings,
            args.report,
            progress=lambda line: print(f"[soak] {line}", file=sys.stderr, flush=True),
        )
        print(
            f"[soak] {'PASS' if result.passed else 'FAIL'}: {summary['faults_fired']} "
            f"fault(s) fired; report in {os.path.join(args.report, 'soak.md')}",
            file=sys.stderr,
        )
        return EXIT_OK if result.passed else EXIT_VIOLATION

    return guarded("elastic chaos soak", work)
