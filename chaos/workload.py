"""The training script chaos scenarios run under ``elastic run``.

A tiny MLP classifier on generated data (like ``examples/classifier.py``, but
sized so that a run takes seconds on two CPU cores and epochs end exactly, so
the sample ledger can be checked for exactly-once per epoch).

What it adds for the suite, none of it inside the product code:

* ``CHAOS_WORKER_FAULTS`` (JSON, see :class:`chaos.faults.WorkerFaults`): the
  checkpoint store of this worker reads and writes through a
  :class:`~chaos.faultfs.FaultyFileSystem` with that plan (the store is opened
  by the factory :func:`store_factory` hands ``Trainer(checkpoint_store_factory=)``).
* The signal of every fault kind that acts inside the worker (``signal`` and
  ``in_worker`` of its class in ``chaos/kinds.py``): SIGUSR1 makes the next step
  raise inside ``loss_fn``, SIGUSR2 makes the next ``slow_steps`` steps take
  ``slow_step_s`` longer, SIGPWR hangs the main thread for good.
* ``--break COMPONENT`` plugs in a deliberately broken component, to show that
  the invariant checks catch it:
  ``sampler`` (shares are not re-split after a World change),
  ``fence`` (checkpoint commits skip the generation compare),
  ``store`` (the manifest is published before the data files),
  ``hang`` (a worker never exits after training).
* ``--out-dir``: each worker that finished training writes its parameters to
  ``<member id>.pt`` there (a worker that joined after the end writes nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from chaos.faults import BREAKS, KINDS, WorkerFaults
from chaos.spec import FaultKind
from storage.layout import step_dir

DIM, CLASSES, HIDDEN = 16, 4, 32


def make_dataset(n: int, seed: int = 1234) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, DIM, generator=g) * 2.0
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = centers[labels] + torch.randn(n, DIM, generator=g)
    return TensorDataset(x, labels)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="chaos suite workload")
    p.add_argument("--dataset-size", type=int, default=760)
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--step-time",
        type=float,
        default=0.0,
        help="extra seconds per step, standing in for a bigger model",
    )
    p.add_argument("--out-dir", default=None)
    p.add_argument("--break", dest="breaks", action="append", default=[], choices=BREAKS)
    return p


class _Chaos:
    """Signal-driven in-step faults: each kind's handler sets a flag here (or hangs)."""

    def __init__(self, faults: WorkerFaults) -> None:
        self.faults = faults
        self.raise_next = threading.Event()
        self.slow_left = 0

    def install(self) -> None:
        for kind in KINDS.values():
            if kind.signal is not None and type(kind).in_worker is not FaultKind.in_worker:
                signal.signal(kind.signal, lambda *_, k=kind: k.in_worker(self))

    def in_step(self) -> None:
        if self.raise_next.is_set():
            self.raise_next.clear()
            raise RuntimeError("chaos: exception injected inside the training step")
        if self.slow_left > 0:
            self.slow_left -= 1
            time.sleep(self.faults.slow_step_s)  # the simulated slowness itself


# -- deliberately broken components (for "the suite can fail") -------------------


def break_sampler() -> None:
    """Shares keep the split of the first World this worker saw: no re-split."""
    from elastic.train.sampler import ElasticSampler

    original = ElasticSampler.share

    def share(self: Any, rank: int, world_size: int) -> tuple[list[int], int]:
        first = self.__dict__.setdefault("_chaos_first_world", world_size)
        return original(self, min(rank, first - 1), first)

    ElasticSampler.share = share  # type: ignore[method-assign]


def break_fence() -> None:
    """Commit fence that records the commit without comparing the generation."""
    from elastic.coord.etcd import retry_call
    from elastic.coord.rendezvous import Rendezvous

    def commit_fence(self: Any, generation: int) -> Any:
        def fence(step: int) -> bool:
            record = self.commit_record(step, generation)  # the real record, written unfenced
            retry_call(
                lambda: self.client.put(self.keys.commit(step), record),
                what="recording a commit (no fence)",
                timeout=self.config.op_timeout,
            )
            return True

        return fence

    Rendezvous.commit_fence = commit_fence  # type: ignore[method-assign]


class _Handle:
    """Just enough of storage.SaveHandle for the Trainer: done() and wait()."""

    def __init__(self, step: int, future: concurrent.futures.Future) -> None:
        self.step = step
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)


def manifest_first_store(base: Any, fs: Any, root: str) -> Any:
    """A store class that stages a save elsewhere, then publishes it manifest first.

    The fence and the staging save are the real ones; only the order of the
    final copy is wrong, which is enough for a crash to leave a committed but
    torn checkpoint.
    """

    class ManifestFirstStore(base):  # type: ignore[misc, valid-type]
        def __init__(self, url: str, **kwargs: Any) -> None:
            super().__init__(url, fs=fs, **kwargs)
            self._staging = base(url.rstrip("/") + "-staging", fs=fs, **kwargs)
            self._publisher = concurrent.futures.ThreadPoolExecutor(1)

        def save(self, step: int, state: Any, **kwargs: Any) -> Any:
            info = self._staging.save(step, state, **kwargs)
            if info.committed:
                self._publish(step)
            return info

        def save_async(self, step: int, state: Any, **kwargs: Any) -> Any:
            staged = self._staging.save_async(step, state, **kwargs)
            timeout = kwargs.get("timeout", 300.0)

            def finish() -> Any:
                info = staged.wait(timeout)
                if info.committed:
                    self._publish(step)
                return info

            return _Handle(step, self._publisher.submit(finish))

        def _publish(self, step: int) -> None:
            src_root, dst_root = root.rstrip("/") + "-staging", root.rstrip("/")
            src = f"{src_root}/{step_dir(step)}"
            files = sorted(p for p in fs.find(src) if "/.tmp-" not in p)
            # The defect: the commit record goes first, the data after it.
            files.sort(key=lambda p: not p.endswith("/manifest.json"))
            for path in files:
                data = fs.cat_file(path)
                target = dst_root + path[len(src_root) :]
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                with fs.open(target, "wb") as f:
                    f.write(data)

    return ManifestFirstStore


def store_factory(faults: WorkerFaults, broken: bool) -> Callable[..., Any] | None:
    """What opens this worker's checkpoint store: through FaultyFileSystem (and/or
    broken); None when neither is asked for (the Trainer's default store)."""
    if not faults.storage and not broken:
        return None
    import fsspec

    from chaos.faultfs import FaultyFileSystem
    from storage import CheckpointStore

    made: dict[str, Any] = {}

    def factory(url: str, **kwargs: Any) -> Any:
        inner, root = fsspec.core.url_to_fs(url)
        fs = made.setdefault(url, FaultyFileSystem(inner, faults.fault_plan(root)))
        cls = manifest_first_store(CheckpointStore, fs, root) if broken else CheckpointStore
        return cls(url, **({} if broken else {"fs": fs}), **kwargs)

    return factory


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    faults = WorkerFaults.from_env()
    chaos = _Chaos(faults)
    chaos.install()
    if "sampler" in args.breaks:
        break_sampler()
    if "fence" in args.breaks:
        break_fence()
    open_store = store_factory(faults, broken="store" in args.breaks)

    from elastic import Trainer

    torch.manual_seed(args.seed)
    data = make_dataset(args.dataset_size)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        chaos.in_step()
        if args.step_time > 0:
            time.sleep(args.step_time)  # simulated compute time
        x, y = batch
        return F.cross_entropy(model(x), y)

    trainer = Trainer(
        model,
        opt,
        data,
        loss_fn=loss_fn,
        global_batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        checkpoint_store_factory=open_store,
    )
    result = trainer.fit()
    trained = result.final
    if args.out_dir and trained:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"{trainer.config.member_id}.pt")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    print(
        json.dumps(
            {
                "outcome": result.outcome,
                "step": result.step,
                "trained": trained,
                "generation": result.generation,
                "loss": result.loss,
            }
        ),
        flush=True,
    )
    if "hang" in args.breaks:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Event().wait()  # the defect: never exits
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
