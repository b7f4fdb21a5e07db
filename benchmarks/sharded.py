"""Sharded optimizer state: memory, step time and recovery vs the replicated state.

    python benchmarks/sharded.py [--workers 4] [--width 2048] [--depth 6] [--steps 40]
                                 [--repeats 1] [--exact] [--json out.json]

One invocation, the same machine, model (examples/sharded.py: an MLP with
AdamW), data and global batch on every side, each `elastic run -n W`:

  (a) replicated      every rank holds the whole AdamW state
  (b) sharded k=1     --shard-state --replicas 1: each shard on one owner
  (c) sharded k=2     --shard-state --replicas 2: each shard on two owners

no failures, no checkpoint. Per run, from the lines the example writes
(``--timing``: every rank's clock after each step; ``--report``: each rank's
optimizer state bytes and peak RSS at exit): the per-worker step time (each
rank's median interval between steps after the first ``--warmup``, the
median over ranks), the peak RSS of a worker (``ru_maxrss``, the largest
rank) and the optimizer state bytes of a worker (the largest rank), each as
a ratio to (a) within the same repeat (then the median over repeats). The
ideal state ratio is k/W. The final parameters of (b) and (c) are compared
with (a)'s: the update by slices is the replicated one, so they should match
bitwise.

Then recovery, with a checkpoint every ``--checkpoint-every`` steps on both:

  (d) kill, k=2       SIGKILL rank 1 at step ``--kill-step``: its shards are
                      copied from their surviving copies, no checkpoint read
  (e) kill, k=1       the same kill with --replicas 1: the victim's shards have
                      no copy left, the newest checkpoint is restored

both with --max-restarts 0 (the survivors train on, nothing replaces the
victim). Measured from the event log: seconds from the kill to the next
completed step (the first step of a newer generation), the ``recovered``
event's seconds (from the failure rank 0 saw to that step), steps redone (the
last step of the killed World minus the one the new World resumed after),
whether a checkpoint was read (a ``restore`` event), the shard bytes the new
World moved, and whether the job finished.

Prints a markdown table; ``--json PATH`` writes every run and the summary.
``--step-time S`` sleeps S seconds a step in every run (a tiny model's steps
are too short to kill one mid-run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.recovery import Group, elastic_run, reached, steps_of  # noqa: E402
from elastic.base.events import Event, read_events  # noqa: E402
from elastic.coord.etcd import EmbeddedEtcd  # noqa: E402

EXAMPLE = os.path.join(REPO, "examples", "sharded.py")

# (name, label, launcher options)
STEADY = (
    ("replicated", "replicated", ()),
    ("sharded_k1", "sharded k=1", ("--shard-state", "--replicas", "1")),
    ("sharded_k2", "sharded k=2", ("--shard-state", "--replicas", "2")),
)
KILLS = (
    ("kill_k2", "kill, k=2 (copy from a peer)", ("--shard-state", "--replicas", "2")),
    ("kill_k1", "kill, k=1 (restore the checkpoint)", ("--shard-state", "--replicas", "1")),
)


@dataclass(frozen=True)
class BenchConfig:
    workers: int = 4
    width: int = 2048
    depth: int = 6
    steps: int = 40
    warmup: int = 5
    batch_size: int = 64
    exact: bool = False
    step_time: float = 0.0
    repeats: int = 1
    kill_step: int = 25
    checkpoint_every: int = 10
    give_up: float = 300.0
    run_timeout: float = 1200.0

    def __post_init__(self) -> None:
        if self.workers < 2:
            raise ValueError(f"--workers must be >= 2 (k=2 needs two owners), got {self.workers}")
        if self.width < 1 or self.depth < 0:
            raise ValueError(
                f"--width must be >= 1 and --depth >= 0, got {self.width}, {self.depth}"
            )
        if self.warmup < 1 or self.steps < self.warmup + 2:
            raise ValueError(
                f"--steps {self.steps} must exceed --warmup {self.warmup} by 2 or more "
                "(and --warmup must be >= 1)"
            )
        if self.batch_size < self.workers:
            raise ValueError(
                f"--batch-size {self.batch_size} is less than --workers {self.workers}"
            )
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if not 1 <= self.checkpoint_every < self.kill_step < self.steps:
            raise ValueError(
                f"need 1 <= --checkpoint-every ({self.checkpoint_every}) < --kill-step "
                f"({self.kill_step}) < --steps ({self.steps}): a checkpoint before the kill, "
                "steps after it"
            )
        if self.step_time < 0 or self.give_up <= 0 or self.run_timeout <= 0:
            raise ValueError(
                f"--step-time must be >= 0 and --give-up, --run-timeout > 0, got "
                f"{self.step_time}, {self.give_up}, {self.run_timeout}"
            )

    def script_args(self, files: dict[str, str]) -> list[str]:
        args = [
            "--width",
            str(self.width),
            "--depth",
            str(self.depth),
            "--steps",
            str(self.steps),
            "--batch-size",
            str(self.batch_size),
            "--step-time",
            str(self.step_time),
            "--report",
            files["report"],
            "--timing",
            files["timing"],
            "--out",
            files["out"],
        ]
        return [*args, "--exact"] if self.exact else args


class Run:
    """One `elastic run` of the example: its job id, files and processes."""

    def __init__(self, tmp: str, case: str) -> None:
        self.case = case
        self.job = f"bsh{uuid.uuid4().hex[:8]}"
        base = os.path.join(tmp, self.job)
        self.files = {
            name: f"{base}.{name}"
            for name in ("events.jsonl", "report", "timing", "out", "log", "ckpt")
        }
        self.group = Group()
        self.proc: subprocess.Popen | None = None

    def start(self, cfg: BenchConfig, etcd: str, options: tuple[str, ...]) -> None:
        cmd = [
            *elastic_run(self.job, etcd, self.files["events.jsonl"], cfg.workers, *options),
            EXAMPLE,
            *cfg.script_args(self.files),
        ]
        self.proc = self.group.start(cmd, dict(os.environ), self.files["log"])

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def events(self) -> list[dict]:
        return read_events(self.files["events.jsonl"], missing_ok=True)

    def lines(self, name: str) -> list[dict]:
        try:
            with open(self.files[name]) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def tail(self) -> str:
        try:
            with open(self.files["log"], errors="replace") as f:
                return f.read()[-3000:]
        except FileNotFoundError:
            return ""

    def params(self) -> dict[str, torch.Tensor] | None:
        if not os.path.exists(self.files["out"]):
            return None
        return torch.load(self.files["out"], map_location="cpu", weights_only=True)


def max_diff(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> float | None:
    if a is None or b is None or a.keys() != b.keys():
        return None
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def per_worker_step_time(timing: list[dict], warmup: int) -> float | None:
    """Each rank's median interval between consecutive steps after ``warmup``,
    the median over ranks."""
    per_rank: dict[int, list[dict]] = {}
    for line in timing:
        per_rank.setdefault(line["rank"], []).append(line)
    medians = []
    for lines in per_rank.values():
        lines.sort(key=lambda r: r["step"])
        intervals = [
            b["t"] - a["t"]
            for a, b in zip(lines, lines[1:], strict=False)
            if a["step"] >= warmup and b["step"] == a["step"] + 1
        ]
        if intervals:
            medians.append(statistics.median(intervals))
    return statistics.median(medians) if medians else None


def run_steady(cfg: BenchConfig, etcd: str, tmp: str, case: str, options: tuple[str, ...]) -> dict:
    run = Run(tmp, case)
    record: dict[str, Any] = {"case": case, "job": run.job}
    t0 = time.monotonic()
    try:
        run.start(cfg, etcd, ("--no-checkpoint", "--max-restarts", "0", *options))
        record["rc"] = run.wait(cfg.run_timeout)
    finally:
        run.group.close()
    record["wall_s"] = round(time.monotonic() - t0, 3)
    reports, timing = run.lines("report"), run.lines("timing")
    steps = {line["step"] for line in timing}
    if record["rc"] != 0 or len(reports) != cfg.workers or len(steps) != cfg.steps:
        why = "timed out" if record["rc"] is None else f"exit code {record['rc']}"
        record["error"] = (
            f"{why}, {len(steps)}/{cfg.steps} steps timed, {len(reports)}/{cfg.workers} "
            f"reports; output tail:\n{run.tail()}"
        )
        return record
    record.update(
        step_time=per_worker_step_time(timing, cfg.warmup),
        worker_rss_kib=max(r["max_rss_kib"] for r in reports),
        state_bytes=max(r["optimizer_state_bytes"] for r in reports),
        state_bytes_per_rank={str(r["rank"]): r["optimizer_state_bytes"] for r in reports},
        rss_kib_per_rank={str(r["rank"]): r["max_rss_kib"] for r in reports},
        replicated_bytes=reports[0]["replicated_bytes"],
        params=reports[0]["params"],
    )
    record["_params"] = run.params()
    return record


def kill_rank_1(run: Run) -> tuple[float, int, str] | str:
    """SIGKILL the worker of rank 1 of the newest World: the time, its World's
    generation and its member id, or why not."""
    evs = run.events()
    gens = [e for e in evs if e["event"] == Event.GENERATION]
    if not gens or len(gens[-1]["world"]) < 2:
        return "no World of two or more"
    gen = gens[-1]
    victim = gen["world"][1]
    spawns = [e for e in evs if e["event"] == Event.SPAWN and e["member"] == victim]
    if not spawns:
        return f"no spawn event of {victim}"
    t = time.time()
    os.kill(spawns[-1]["pid"], signal.SIGKILL)
    return t, gen["gen"], victim


def run_kill(cfg: BenchConfig, etcd: str, tmp: str, case: str, options: tuple[str, ...]) -> dict:
    run = Run(tmp, case)
    record: dict[str, Any] = {"case": case, "job": run.job, "recovered": False}
    ckpt = ("--checkpoint", run.files["ckpt"], "--checkpoint-every", str(cfg.checkpoint_every))
    try:
        run.start(cfg, etcd, (*ckpt, "--max-restarts", "0", *options))
        if not reached(run.files["events.jsonl"], cfg.kill_step, cfg.workers, cfg.give_up):
            record["error"] = f"never reached step {cfg.kill_step} with {cfg.workers} workers"
            record["tail"] = run.tail()
            return record
        killed = kill_rank_1(run)
        if isinstance(killed, str):
            record["error"] = killed
            return record
        t_kill, gen, victim = killed
        record["rc"] = run.wait(cfg.run_timeout)
    finally:
        run.group.close()
    evs = run.events()
    steps = steps_of(evs)
    old = [e["step"] for e in steps if e["gen"] <= gen]
    after = [e for e in steps if e["gen"] > gen]
    record.update(victim=victim, fault_at_step=max(old) if old else None)
    record["finished"] = any(e["event"] == Event.FINISHED for e in evs)
    if not after:
        record["error"] = f"no step after the kill; output tail:\n{run.tail()}"
        return record
    first = after[0]
    recovered = [e for e in evs if e["event"] == Event.RECOVERED and e["t"] >= t_kill]
    restores = [e for e in evs if e["event"] == Event.RESTORE and e["t"] >= t_kill]
    new_gens = [e for e in evs if e["event"] == Event.GENERATION and e["gen"] > gen]
    shards = next((e["shards"] for e in new_gens if "shards" in e), None)
    record.update(
        recovered=True,
        seconds=first["t"] - t_kill,
        recovered_event_s=recovered[0]["seconds"] if recovered else None,
        redone=max(old) - (first["step"] - 1),
        resumed_after=first["step"] - 1,
        restored=bool(restores),
        restored_step=restores[0]["step"] if restores else None,
        shards=shards,
        world_after=first["world"],
    )
    record["_params"] = run.params()
    return record


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(cfg: BenchConfig, runs: list[dict]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    by = {(r["repeat"], r["case"]): r for r in runs}
    for case, label, options in STEADY:
        ok = [r for r in runs if r["case"] == case and "error" not in r]
        k = int(options[-1]) if options else None
        row: dict[str, Any] = {
            "label": label,
            "runs": len(ok),
            "ideal_state_ratio": 1.0 if k is None else k / cfg.workers,
            "step_time": med([r["step_time"] for r in ok]),
            "worker_rss_kib": med([r["worker_rss_kib"] for r in ok]),
            "state_bytes": med([r["state_bytes"] for r in ok]),
            "max_abs_diff_vs_replicated": med([r.get("max_abs_diff_vs_replicated") for r in ok]),
        }
        for key, field in (
            ("step_time_ratio", "step_time"),
            ("rss_ratio", "worker_rss_kib"),
            ("state_bytes_ratio", "state_bytes"),
        ):
            ratios = []
            for r in ok:
                base = by.get((r["repeat"], "replicated"))
                if base and "error" not in base and base[field] and r[field] is not None:
                    ratios.append(r[field] / base[field])
            row[key] = med(ratios)
        summary[case] = row
    for case, label, _ in KILLS:
        rs = [r for r in runs if r["case"] == case]
        ok = [r for r in rs if r.get("recovered")]
        summary[case] = {
            "label": label,
            "trials": len(rs),
            "recovered": len(ok),
            "finished": sum(bool(r.get("finished")) for r in ok),
            "seconds": med([r["seconds"] for r in ok]),
            "recovered_event_s": med([r["recovered_event_s"] for r in ok]),
            "redone": med([r["redone"] for r in ok]),
            "restored": sum(bool(r["restored"]) for r in ok),
            "moved_bytes": med([(r["shards"] or {}).get("moved") for r in ok]),
            "max_abs_diff_vs_replicated": med([r.get("max_abs_diff_vs_replicated") for r in ok]),
        }
    return summary


def _f(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x / scale, spec)


def table(cfg: BenchConfig, summary: dict[str, dict[str, Any]], params: int | None) -> str:
    mib = 2**20
    lines = [
        "| state | step time per worker (s) | ratio | peak RSS per worker (MiB) | ratio "
        "| optimizer state per worker (MiB) | ratio | ideal (k/W) | final params vs replicated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, _, _ in STEADY:
        row = summary[case]
        lines.append(
            f"| {row['label']} | {_f(row['step_time'], '.4f')} "
            f"| {_f(row['step_time_ratio'], '.3f')} "
            f"| {_f(row['worker_rss_kib'], '.0f', 1024)} | {_f(row['rss_ratio'], '.3f')} "
            f"| {_f(row['state_bytes'], '.1f', mib)} | **{_f(row['state_bytes_ratio'], '.3f')}** "
            f"| {row['ideal_state_ratio']:.3f} | {_f(row['max_abs_diff_vs_replicated'], '.1e')} |"
        )
    lines += [
        "",
        "| kill of rank 1 | recovered | finished | kill -> next step (s) | `recovered` event (s) "
        "| steps redone | checkpoint read | shards moved (MiB) | final params vs replicated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, _, _ in KILLS:
        row = summary[case]
        lines.append(
            f"| {row['label']} | {row['recovered']}/{row['trials']} "
            f"| {row['finished']}/{row['trials']} | {_f(row['seconds'], '.3f')} "
            f"| {_f(row['recovered_event_s'], '.3f')} | {_f(row['redone'], '.0f')} "
            f"| {row['restored']}/{row['recovered']} | {_f(row['moved_bytes'], '.1f', mib)} "
            f"| {_f(row['max_abs_diff_vs_replicated'], '.1e')} |"
        )
    lines += [
        "",
        f"{cfg.workers} workers, MLP 256-{cfg.width}x{cfg.depth + 1}-10 "
        f"({'?' if params is None else f'{params:,}'} params), AdamW, global batch "
        f"{cfg.batch_size}, {cfg.steps} steps{', --exact' if cfg.exact else ''}"
        f"{f', {cfg.step_time} s sleep a step' if cfg.step_time else ''}; median over "
        f"{cfg.repeats} repeat(s). Step time: each rank's median interval after the first "
        f"{cfg.warmup} steps, the median over ranks; peak RSS: ru_maxrss of the largest "
        "worker; optimizer state: job.optimizer_state_bytes() of the largest worker; ratios "
        "to replicated within a repeat. Kills: SIGKILL of rank 1 at step "
        f"{cfg.kill_step}, --max-restarts 0 (the survivors train on), a checkpoint every "
        f"{cfg.checkpoint_every} steps on both; final params: the max abs difference from "
        "the replicated run's (a different World size after the kill: bitwise only with "
        "--exact).",
    ]
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict[str, Any]:
    runs: list[dict] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp,
        EmbeddedEtcd(data_dir=os.path.join(tmp, "etcd")) as etcd,
    ):
        for i in range(cfg.repeats):
            reference = None
            cases = [(c, o, run_steady) for c, _, o in STEADY]
            cases += [(c, o, run_kill) for c, _, o in KILLS]
            for case, options, fn in cases:
                r = fn(cfg, etcd.url, tmp, case, options)
                r["repeat"] = i
                got = r.pop("_params", None)
                if case == "replicated":
                    reference = got
                else:
                    r["max_abs_diff_vs_replicated"] = max_diff(got, reference)
                runs.append(r)
                shown = {k: v for k, v in r.items() if k not in ("tail", "error")}
                if "error" in r:
                    shown["error"] = r["error"].splitlines()[0]
                print(f"repeat {i + 1}/{cfg.repeats} {case}: {shown}", file=sys.stderr, flush=True)
    summary = summarize(cfg, runs)
    params = next((r["params"] for r in runs if "params" in r), None)
    return {
        "config": asdict(cfg),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "params": params,
        "summary": summary,
        "runs": runs,
        "table": table(cfg, summary, params),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchConfig()
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--depth", type=int, default=d.depth, help="hidden width x width layers")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--warmup", type=int, default=d.warmup, help="steps left out of step time")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    ap.add_argument("--exact", action="store_true", help="pass --exact to every run")
    ap.add_argument("--step-time", type=float, default=d.step_time, help="sleep a step")
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--kill-step", type=int, default=d.kill_step)
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    ap.add_argument("--give-up", type=float, default=d.give_up, help="seconds to reach the kill")
    ap.add_argument("--run-timeout", type=float, default=d.run_timeout, help="seconds per run")
    ap.add_argument("--json", default=None, help="write every run and the summary here")
    args = ap.parse_args()
    try:
        cfg = BenchConfig(
            workers=args.workers,
            width=args.width,
            depth=args.depth,
            steps=args.steps,
            warmup=args.warmup,
            batch_size=args.batch_size,
            exact=args.exact,
            step_time=args.step_time,
            repeats=args.repeats,
            kill_step=args.kill_step,
            checkpoint_every=args.checkpoint_every,
            give_up=args.give_up,
            run_timeout=args.run_timeout,
        )
    except ValueError as exc:
        ap.error(str(exc))
    results = run(cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(results["table"])
    complete = all(results["summary"][c]["runs"] == cfg.repeats for c, _, _ in STEADY) and all(
        results["summary"][c]["recovered"] == cfg.repeats for c, _, _ in KILLS
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
