"""Checkpoint store vs torch.distributed.checkpoint (DCP), side by side, on local disk.

    python benchmarks/checkpoint.py                 # ~300 MB state, 3 repeats, 1 and 3 ranks
    python benchmarks/checkpoint.py --quick         # 16 MB smoke run
    python benchmarks/checkpoint.py --size-mb 500 --repeat 5 --ranks 3 --json out.json

Measured for both, in the same run and on the same state (a transformer-like
dict of float32 matrices plus a step counter):

* save: a blocking save, returning once the checkpoint is durable;
* async blocked: how long the training thread is blocked by an asynchronous
  save (our `save_async`, DCP `async_save`), and the time until it is durable,
  for the first asynchronous save of a store and for the next one (periodic
  checkpoints pay the latter);
* async extra RSS: peak resident memory above the baseline during the async save;
* load: restoring the newest checkpoint (ours verifies every checksum and
  allocates the tensors; DCP fills a preallocated template);
* torch.save + fsync and torch.load(weights_only=True) of the same state, as
  reference points; throughputs in GB/s (10^9 bytes) and ratios.

With --ranks W > 1 the same is measured in W processes (gloo, torch.multiprocessing)
that all hold the replicated state; times are rank 0's between barriers and the
memory figure is the worst rank's.  Figures are medians over --repeat runs.
Page cache is warm for loads (the files were just written).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from storage import CheckpointStore  # noqa: E402  (runnable as a script from anywhere)

MB = 2**20
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


def make_state(size_mb: float) -> dict[str, Any]:
    """Transformer-like layers (qkv, out, mlp up/down, norms) adding up to about size_mb."""
    d = 1024 if size_mb >= 96 else 256
    layer_bytes = 12 * d * d * 4
    layers = max(1, round(size_mb * MB / layer_bytes))
    gen = torch.Generator().manual_seed(0)
    model: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name, shape in (
            ("attn.qkv.weight", (3 * d, d)),
            ("attn.out.weight", (d, d)),
            ("mlp.up.weight", (4 * d, d)),
            ("mlp.down.weight", (d, 4 * d)),
            ("norm.weight", (d,)),
            ("norm.bias", (d,)),
        ):
            model[f"layers.{i}.{name}"] = torch.randn(shape, generator=gen)
    return {"model": model, "step": 100}


def state_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state["model"].values())


_libc = ctypes.CDLL(None)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so that RSS measures live memory only."""
    _libc.malloc_trim(0)


def big_allocations_use_mmap() -> None:
    # glibc otherwise raises its mmap threshold after the first large free and keeps
    # later freed buffers in the heap: the second measured save would look free.
    _libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss(limit_s: float = 3.0) -> int:
    """RSS once memory freed by the previous measurement (on its threads) is gone."""
    deadline = time.monotonic() + limit_s
    last = -1
    while True:
        gc.collect()
        release_free_memory()
        now = rss()
        if abs(now - last) < MB or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.05)  # let background threads drop their references


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample resident memory every 5 ms; yields {'extra': peak - baseline}."""
    out = {"extra": 0}
    base = settled_rss()
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join(timeout=10)
        out["extra"] = max(0, peak - base)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def template(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}, "step": 0}


class Runner:
    """One process's measurements (rank `rank` of `world`)."""

    def __init__(self, root: str, state: dict[str, Any], rank: int, world: int) -> None:
        self.root, self.state, self.rank, self.world = root, state, rank, world
        self.results: dict[str, list[float]] = {}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def worst(self, value: float) -> float:
        """The maximum over ranks (blocking times, memory)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def record(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)

    def phase(self, key: str, fn: Callable[[], Any]) -> Any:
        """Time fn between barriers (the slowest rank decides), record it, return its result."""
        self.barrier()
        elapsed, result = timed(fn)
        self.barrier()
        self.record(key, self.worst(elapsed))
        return result

    def async_phase(
        self, prefix: str, start: Callable[[], Any], finish: Callable[[Any], Any]
    ) -> None:
        self.barrier()
        with peak_rss() as mem:
            t0 = time.perf_counter()
            pending = start()
            blocked = time.perf_counter() - t0
            finish(pending)
            total = time.perf_counter() - t0
        self.barrier()
        self.record(f"{prefix} async blocked (s)", self.worst(blocked))
        self.record(f"{prefix} async until durable (s)", self.worst(total))
        self.record(f"{prefix} async extra RSS (MB)", self.worst(mem["extra"] / MB))

    def run(self, repeat: int) -> None:
        for i in range(repeat):
            # Alternate who goes first, so that neither profits from the other's
            # warm-up (page cache, allocator, disk write-back).
            self.run_once(f"{self.root}/r{i}", store_first=i % 2 == 0)

    def run_once(self, base: str, store_first: bool) -> None:
        no_dist = self.world == 1
        ours = CheckpointStore(f"file://{base}/ours")
        ours_async = CheckpointStore(f"file://{base}/ours-async")
        kw = {
            "rank": self.rank,
            "world_size": self.world,
            "per_rank_state": {"rng": torch.get_rng_state()},
            "timeout": 600,
        }
        check = self.state["model"]["layers.0.mlp.up.weight"]

        def store_load() -> None:
            _, loaded = self.phase(
                "store load (s)", lambda: CheckpointStore(f"file://{base}/ours").load(1)
            )
            assert torch.equal(loaded["model"]["layers.0.mlp.up.weight"], check)

        def dcp_load() -> None:
            target = template(self.state)
            self.phase(
                "dcp load (s)",
                lambda: dcp.load(target, checkpoint_id=f"{base}/dcp", no_dist=no_dist),
            )
            assert torch.equal(target["model"]["layers.0.mlp.up.weight"], check)

        pairs: list[tuple[Callable[[], Any], Callable[[], Any]]] = [
            (
                lambda: self.phase("store save (s)", lambda: ours.save(1, self.state, **kw)),
                lambda: self.phase(
                    "dcp save (s)",
                    lambda: dcp.save(self.state, checkpoint_id=f"{base}/dcp", no_dist=no_dist),
                ),
            ),
            (
                # The first async save and a later one: a training run checkpoints
                # periodically, and what it pays from the second save on is what
                # matters (ours reuses its snapshot buffer; DCP's default stager
                # allocates a fresh copy each time).
                lambda: [
                    self.async_phase(
                        f"store {which}",
                        lambda step=step: ours_async.save_async(step, self.state, **kw),
                        lambda handle: handle.wait(600),
                    )
                    for step, which in ((1, "first"), (2, "later"))
                ],
                lambda: [
                    self.async_phase(
                        f"dcp {which}",
                        lambda step=step: dcp.async_save(
                            self.state, checkpoint_id=f"{base}/dcp-async{step}", no_dist=no_dist
                        ),
                        lambda future: future.result(),
                    )
                    for step, which in ((1, "first"), (2, "later"))
                ],
            ),
            (store_load, dcp_load),
        ]
        for first, second in pairs:
            if not store_first:
                first, second = second, first
            first()
            second()
        if self.rank == 0:

            def plain() -> None:
                with open(f"{base}/plain.pt", "wb") as f:
                    torch.save(self.state, f)
                    f.flush()
                    os.fsync(f.fileno())

            self.record("torch.save + fsync (s)", timed(plain)[0])
            self.record(
                "torch.load (s)",
                timed(lambda: torch.load(f"{base}/plain.pt", weights_only=True))[0],
            )
        ours.close()
        ours_async.close()
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(base, ignore_errors=True)


def _worker(rank: int, world: int, root: str, size_mb: float, repeat: int, out: str) -> None:
    big_allocations_use_mmap()
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        runner = Runner(f"{root}/ckpt", make_state(size_mb), rank, world)
        runner.run(repeat)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(runner.results, f)
    finally:
        dist.destroy_process_group()


def measure(size_mb: float, repeat: int, world: int, workdir: str) -> dict[str, list[float]]:
    root = tempfile.mkdtemp(prefix=f"ckpt-bench-w{world}-", dir=workdir)
    try:
        if world == 1:
            runner = Runner(f"{root}/ckpt", make_state(size_mb), 0, 1)
            runner.run(repeat)
            return runner.results
        out = f"{root}/results.json"
        mp.spawn(_worker, args=(world, root, size_mb, repeat, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)
    finally:
        shutil.rmtree(root, ignore_errors=True)


ROWS = [("save (s)", "store save (s)", "dcp save (s)")]
for _which in ("first", "later"):
    ROWS += [
        (
            f"async, {_which} save: training blocked (s)",
            f"store {_which} async blocked (s)",
            f"dcp {_which} async blocked (s)",
        ),
        (
            f"async, {_which} save: until durable (s)",
            f"store {_which} async until durable (s)",
            f"dcp {_which} async until durable (s)",
        ),
        (
            f"async, {_which} save: peak extra RSS (MB)",
            f"store {_which} async extra RSS (MB)",
            f"dcp {_which} async extra RSS (MB)",
        ),
    ]
ROWS.append(("load (s)", "store load (s)", "dcp load (s)"))


def table(results: dict[str, list[float]], world: int, size: int) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        f"**{world} rank(s), {size / MB:.0f} MB of tensors** "
        f"(median of {len(results['store save (s)'])})",
        "",
        "| metric | this store | DCP | store / DCP |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, ours, theirs in ROWS:
        a, b = med[ours], med[theirs]
        ratio = f"{a / b:.2f}" if b > 0 else "n/a"
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |")
    gb = size / 1e9
    lines.append(
        f"| save throughput (GB/s) | {gb / med['store save (s)']:.2f} "
        f"| {gb / med['dcp save (s)']:.2f} | {med['dcp save (s)'] / med['store save (s)']:.2f} |"
    )
    lines.append(
        f"| load + verify throughput (GB/s; DCP does not verify) "
        f"| {gb / med['store load (s)']:.2f} | {gb / med['dcp load (s)']:.2f} "
        f"| {med['dcp load (s)'] / med['store load (s)']:.2f} |"
    )
    lines.append(
        "| async later save blocked / our synchronous save "
        f"| {med['store later async blocked (s)'] / med['store save (s)']:.2f} | | |"
    )
    if "torch.save + fsync (s)" in med:
        ts, tl = med["torch.save + fsync (s)"], med["torch.load (s)"]
        lines.append(
            f"| torch.save + fsync, reference: s, GB/s, store throughput / torch.save "
            f"| {ts:.3f} | {gb / ts:.2f} GB/s | {ts / med['store save (s)']:.2f} |"
        )
        lines.append(
            f"| torch.load (weights_only), reference: s, GB/s, store load / torch.load "
            f"| {tl:.3f} | {gb / tl:.2f} GB/s | {tl / med['store load (s)']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=float, default=300.0, help="state size (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--ranks", type=int, default=3, help="also run with this many ranks (1: skip)"
    )
    parser.add_argument("--dir", default=None, help="work directory on the disk to test")
    parser.add_argument("--quick", action="store_true", help="16 MB, one repeat: a smoke test")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeat = 16.0, 1
    big_allocations_use_mmap()
    workdir = args.dir or tempfile.gettempdir()
    os.makedirs(workdir, exist_ok=True)
    size = state_bytes(make_state(args.size_mb))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), work dir {workdir}\n")
    raw: dict[str, Any] = {}
    for world in [1] + ([args.ranks] if args.ranks > 1 else []):
        results = measure(args.size_mb, args.repeat, world, workdir)
        raw[str(world)] = results
        print(table(results, world, size), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size_bytes": size, "results": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
