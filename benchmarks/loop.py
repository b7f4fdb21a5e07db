"""A script's own loop, elastic vs the same loop as plain DDP under torchrun.

    python benchmarks/loop.py [--repeats 3] [--steps 110] [--models large,small]
                              [--loader-workers 2,0] [--quick] [--out bench-out/loop]

Side by side in one invocation: ``elastic run -n 2 examples/own_loop.py`` and
``python -m torch.distributed.run --standalone --nproc-per-node 2
benchmarks/ddp_loop.py`` (DDP, DistributedSampler + DataLoader), the same
model, data, optimizer, schedule, accumulation, autocast and clipping, no
failures. Each repeat runs every setup (model x DataLoader workers) on both
sides, elastic then DDP, so drift of the machine affects both alike.

Per run, from the ``--timing`` lines the scripts write (rank 0's clock after
each optimizer step, each rank's peak RSS at exit): the steady-state step
time, the median interval between steps after the first ``--warmup``; samples/s,
the global batch times the steps after the warm-up over their wall time (a
stall the median hides counts here); the peak RSS of a training process
(``ru_maxrss``, the larger of the two ranks; DataLoader workers not included).
Reported: the median over repeats of each, and of the per-repeat ratios
elastic / DDP (goals: step time <= 1.03, RSS within 2 %).

Both sides run with OMP_NUM_THREADS=1 per worker (what the elastic launcher
sets by default, set explicitly for torchrun) and no evaluation
(``--eval-every`` past the last step). Writes results.json (every run) and
results.md (the table) to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

from benchmarks.recovery import Group, elastic_run  # noqa: E402
from elastic.coord.etcd import EmbeddedEtcd  # noqa: E402

OWN_LOOP = os.path.join(REPO, "examples", "own_loop.py")
DDP_LOOP = os.path.join(HERE, "ddp_loop.py")
TRAIN_ROWS = 1440  # own_loop.py's training set
SIDES = ("elastic", "ddp")


@dataclass(frozen=True)
class Model:
    name: str
    width: int
    depth: int
    batch_size: int  # global; dividing TRAIN_ROWS, so every step is a full batch
    micro_batches: int  # per global batch: micro_batches / workers on each rank

    @property
    def params(self) -> int:
        w = self.width
        return 16 * w + w + (self.depth - 1) * (w * w + w) + 3 * w + 3

    def label(self) -> str:
        return (
            f"{self.name}: MLP 16-{self.width}x{self.depth}-3 ({self.params:,} params), "
            f"batch {self.batch_size}, {self.micro_batches} micro-batches"
        )


MODELS = {
    # Compute dominates the step on CPU: ~0.1 s of matmuls against one
    # all-reduce of 13 MB.
    "large": Model("large", 1024, 4, 288, 4),
    # own_loop.py's defaults: the runtime's own cost dominates.
    "small": Model("small", 64, 1, 48, 6),
}


@dataclass(frozen=True)
class BenchConfig:
    repeats: int = 3
    steps: int = 110
    warmup: int = 10
    workers: int = 2
    models: tuple[str, ...] = ("large", "small")
    loader_workers: tuple[int, ...] = (2, 0)
    run_timeout: float = 600.0
    out: str = "bench-out/loop"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.warmup < 1 or self.steps < self.warmup + 2:
            raise ValueError(
                f"--steps {self.steps} must exceed --warmup {self.warmup} by 2 or more "
                "(and --warmup must be >= 1)"
            )
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"--models: unknown {unknown} (known: {', '.join(MODELS)})")
        if not self.loader_workers or any(n < 0 for n in self.loader_workers):
            raise ValueError(f"--loader-workers must be >= 0, got {list(self.loader_workers)}")
        for m in self.models:
            model = MODELS[m]
            if model.micro_batches % self.workers or model.batch_size % self.workers:
                raise ValueError(
                    f"model {m}: batch {model.batch_size} and {model.micro_batches} "
                    f"micro-batches must split evenly over {self.workers} workers"
                )
        if self.run_timeout <= 0:
            raise ValueError(f"--run-timeout must be > 0, got {self.run_timeout}")


@dataclass(frozen=True)
class Setup:
    model: Model
    loader_workers: int

    @property
    def key(self) -> str:
        return f"{self.model.name}/nw{self.loader_workers}"

    def script_args(self, cfg: BenchConfig, timing: str) -> list[str]:
        m = self.model
        return [
            "--steps",
            str(cfg.steps),
            "--epochs",
            str(math.ceil(cfg.steps * m.batch_size / TRAIN_ROWS)),
            "--batch-size",
            str(m.batch_size),
            "--micro-batches",
            str(m.micro_batches),
            "--num-workers",
            str(self.loader_workers),
            "--width",
            str(m.width),
            "--depth",
            str(m.depth),
            "--eval-every",
            str(cfg.steps + 1),
            "--timing",
            timing,
        ]


def side_cmd(side: str, setup: Setup, cfg: BenchConfig, etcd: str, tmp: str, tag: str) -> list[str]:
    args = setup.script_args(cfg, os.path.join(tmp, f"{tag}.timing.jsonl"))
    if side == "elastic":
        events = os.path.join(tmp, f"{tag}.events.jsonl")
        # --max-restarts 0, torchrun's default: a crash is an error, not a hidden restart.
        options = ("--no-checkpoint", "--max-restarts", "0")
        return [*elastic_run(tag, etcd, events, cfg.workers, *options), OWN_LOOP, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(cfg.workers),
        DDP_LOOP,
        *args,
    ]


def read_timing(path: str) -> tuple[list[float], list[dict]]:
    """Rank 0's clock after each step, in order, and every rank's peak RSS line."""
    times: list[float] = []
    rss: list[dict] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return times, rss
    for line in lines:
        record = json.loads(line)
        if "t" in record:
            times.append(float(record["t"]))
        elif "max_rss_kib" in record:
            rss.append(record)
    return times, rss


def measure(times: list[float], rss: list[dict], batch: int, warmup: int) -> dict[str, Any]:
    intervals = [b - a for a, b in zip(times[warmup - 1 :], times[warmup:], strict=False)]
    return {
        "steps": len(times),
        "step_time": statistics.median(intervals),
        "samples_per_s": batch * len(intervals) / (times[-1] - times[warmup - 1]),
        "rss_kib": {str(r["rank"]): int(r["max_rss_kib"]) for r in rss},
        "worker_rss_kib": max(int(r["max_rss_kib"]) for r in rss),
    }


def run_side(side: str, setup: Setup, cfg: BenchConfig, etcd: str, tmp: str) -> dict[str, Any]:
    tag = f"bl{uuid.uuid4().hex[:8]}"
    out = os.path.join(tmp, f"{tag}.out")
    # The elastic launcher sets 1 intra-op thread per worker by default
    # (launcher._share_cores); torchrun's workers get the same.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    record: dict[str, Any] = {"side": side, "setup": setup.key, "tag": tag}
    g = Group()
    t0 = time.monotonic()
    try:
        p = g.start(side_cmd(side, setup, cfg, etcd, tmp, tag), env, out)
        try:
            record["rc"] = p.wait(timeout=cfg.run_timeout)
        except subprocess.TimeoutExpired:
            record["rc"] = None
    finally:
        g.close()
    record["wall_s"] = time.monotonic() - t0
    times, rss = read_timing(os.path.join(tmp, f"{tag}.timing.jsonl"))
    if record["rc"] != 0 or len(times) != cfg.steps or len(rss) != cfg.workers:
        with open(out, errors="replace") as f:
            tail = f.read()[-3000:]
        why = "timed out" if record["rc"] is None else f"exit code {record['rc']}"
        record["error"] = (
            f"{why}, {len(times)}/{cfg.steps} steps timed, {len(rss)}/{cfg.workers} RSS lines; "
            f"output tail:\n{tail}"
        )
        return record
    record.update(measure(times, rss, setup.model.batch_size, cfg.warmup))
    return record


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(setups: list[Setup], runs: list[dict]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for setup in setups:
        ok = [r for r in runs if r["setup"] == setup.key and "error" not in r]
        per_side = {s: [r for r in ok if r["side"] == s] for s in SIDES}
        row: dict[str, Any] = {"label": setup.model.label(), "loader_workers": setup.loader_workers}
        for side, rs in per_side.items():
            row[side] = {
                "runs": len(rs),
                "step_time": med([r["step_time"] for r in rs]),
                "samples_per_s": med([r["samples_per_s"] for r in rs]),
                "worker_rss_kib": med([r["worker_rss_kib"] for r in rs]),
            }
        # Ratios within a repeat (both sides run back to back), then the median.
        pairs = [
            (e, d)
            for e in per_side["elastic"]
            for d in per_side["ddp"]
            if e["repeat"] == d["repeat"]
        ]
        row["step_time_ratio"] = med([e["step_time"] / d["step_time"] for e, d in pairs])
        row["rss_ratio"] = med([e["worker_rss_kib"] / d["worker_rss_kib"] for e, d in pairs])
        summary[setup.key] = row
    return summary


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(cfg: BenchConfig, summary: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "| model | loader workers | step time: elastic, DDP (s) | ratio | samples/s: elastic, DDP "
        "| peak RSS per worker: elastic, DDP (MiB) | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary.values():
        e, d = row["elastic"], row["ddp"]
        mib = [None if s["worker_rss_kib"] is None else s["worker_rss_kib"] / 1024 for s in (e, d)]
        lines.append(
            f"| {row['label']} | {row['loader_workers']} "
            f"| {_f(e['step_time'], '.4f')}, {_f(d['step_time'], '.4f')} "
            f"| **{_f(row['step_time_ratio'], '.3f')}** "
            f"| {_f(e['samples_per_s'], '.0f')}, {_f(d['samples_per_s'], '.0f')} "
            f"| {_f(mib[0], '.0f')}, {_f(mib[1], '.0f')} | {_f(row['rss_ratio'], '.3f')} |"
        )
    failed = sum(
        r["elastic"]["runs"] < cfg.repeats or r["ddp"]["runs"] < cfg.repeats
        for r in summary.values()
    )
    lines += [
        "",
        f"{cfg.workers} workers, no failures, {cfg.steps} steps, median over {cfg.repeats} "
        f"repeat(s) (elastic then DDP in each); step time: median interval after the first "
        f"{cfg.warmup} steps; samples/s: global batch x steps after the warm-up / their wall "
        "time; ratios: elastic / DDP per repeat, median. OMP_NUM_THREADS=1 per worker on both "
        "sides (the elastic launcher's default, set explicitly for torchrun); no evaluation; "
        "bf16 autocast, AdamW, clipping, warmup + cosine on both. Peak RSS: ru_maxrss of a "
        "training process (the larger rank), DataLoader workers not included. DDP's "
        "DataLoader starts its workers again every epoch (persistent_workers off, torch's "
        "default; an epoch is 1440 rows), the elastic loader once per World. Goals: step "
        "time ratio <= 1.03, RSS within 2 %.",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, torch {machine['torch']}.",
    ]
    if failed:
        lines.append(f"{failed} setup(s) with failed runs: see results.json.")
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict[str, Any]:
    setups = [Setup(MODELS[m], nw) for m in cfg.models for nw in cfg.loader_workers]
    runs: list[dict] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp,
        EmbeddedEtcd(data_dir=os.path.join(tmp, "etcd")) as etcd,
    ):
        for i in range(cfg.repeats):
            for setup in setups:
                for side in SIDES:  # A B A B: alternating, drift hits both alike
                    r = run_side(side, setup, cfg, etcd.url, tmp)
                    r["repeat"] = i
                    runs.append(r)
                    shown = (
                        r.get("error", "").splitlines()[0]
                        if "error" in r
                        else (
                            f"step {r['step_time']:.4f} s, {r['samples_per_s']:.0f} samples/s, "
                            f"RSS {r['worker_rss_kib'] / 1024:.0f} MiB"
                        )
                    )
                    print(
                        f"repeat {i + 1}/{cfg.repeats} {setup.key} {side}: {shown} "
                        f"({r['wall_s']:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    summary = summarize(setups, runs)
    return {
        "config": asdict(cfg),
        "machine": machine,
        "summary": summary,
        "runs": runs,
        "table": table(cfg, summary, machine),
    }


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchConfig()
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--warmup", type=int, default=d.warmup, help="steps left out at the start")
    ap.add_argument("--workers", type=int, default=d.workers, help="training processes a side")
    ap.add_argument("--models", default=",".join(d.models), help=f"of {', '.join(MODELS)}")
    ap.add_argument("--loader-workers", default=",".join(map(str, d.loader_workers)))
    ap.add_argument("--run-timeout", type=float, default=d.run_timeout, help="seconds per run")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 1 repeat, 20 steps, warm-up 5, the small model",
    )
    ap.add_argument("--out", default=d.out)
    args = ap.parse_args()
    options: dict[str, Any] = {
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "models": tuple(m for m in args.models.split(",") if m),
        "loader_workers": _ints(args.loader_workers),
        "run_timeout": args.run_timeout,
        "out": args.out,
    }
    if args.quick:
        options.update(repeats=1, steps=20, warmup=5, models=("small",))
    try:
        cfg = BenchConfig(**options)
    except ValueError as exc:
        ap.error(str(exc))
    results = run(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(results["table"] + "\n")
    print(results["table"])
    complete = all(
        row[s]["runs"] == cfg.repeats for row in results["summary"].values() for s in SIDES
    )
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
