"""The worker's training loop: step boundaries, failures, re-formation, sync.

Per step every rank computes the gradient of its share of the global batch,
scaled by share/B, and one all-reduce sums gradients together with a few
control flags (re-form due, stop requested, someone leaving). The update is
applied only after that all-reduce succeeded, so a failed collective leaves the
state at the last completed step: that is the rollback. Because the flags ride
on the same all-reduce, every rank learns of a membership change after the
same step and they all switch generation together.

After a new World forms, ranks agree on the newest step any of them holds and
one holder broadcasts it (joiners get state from peers). Storage is read only
when no live rank has state: a whole-job restart with ``resume``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import TensorDataset, default_collate

from ..base.errors import (
    ConfigError,
    ElasticError,
    EtcdUnavailableError,
    JobEnded,
    RendezvousTimeoutError,
    SessionLostError,
    WorkerGroupError,
)
from ..base.events import Event, EventLog, error_fields
from ..base.exitcodes import EXIT_FINISHED, EXIT_LEFT, EXIT_STOPPED
from ..coord.etcd import connect, retry_call
from ..coord.hangs import HangWatch, StepClock
from ..coord.keys import Keyspace
from ..coord.membership import Member
from ..coord.rendezvous import Rendezvous
from .config import RuntimeConfig
from .exithook import install_exit_hook
from .group import StoreHost, WorkerGroup, local_device
from .ledger import LedgerWriter
from .sampler import ElasticSampler
from .state import TrainState

if TYPE_CHECKING:
    from storage import CheckpointStore

log = logging.getLogger(__name__)


_FLAG_REFORM, _FLAG_STOP, _FLAG_LEAVE, _LOSS = range(4)
_N_CONTROL = 4


@dataclass(frozen=True)
class FitResult:
    outcome: str  # "finished", "stopped" or "left"
    step: int
    generation: int
    loss: float | None
    # True when this member holds the job's final state: it trained to the last
    # step.  A worker that joins (or is respawned) after the job finished gets
    # outcome "finished" with untrained parameters; it must not publish them.
    final: bool = False

    @property
    def exit_code(self) -> int:
        return {"finished": EXIT_FINISHED, "left": EXIT_LEFT}.get(self.outcome, EXIT_STOPPED)


LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class Trainer:
    """Runs ``loss_fn`` over the dataset on whichever workers are alive.

    ``loss_fn(model, batch)`` returns the mean loss over ``batch`` (the
    runtime weights it by the batch's share of the global batch, so the
    update does not depend on the number of workers).

    ``grad_shards``: cut every global batch into this many fixed micro-batches
    and sum their gradients exactly (in float64), so the update is bitwise the
    same for any number of workers (up to ``grad_shards``). Without it each rank
    takes one backward pass over its share and the float32 sum's rounding
    depends on the world size: harmless for SGD (differences near 1e-7), but
    adaptive optimizers such as Adam amplify it. Costs one backward pass per
    micro-batch and a float64 all-reduce.

    ``checkpoint_store_factory(url, key=key)`` opens the checkpoint location
    (``--checkpoint``) in place of ``storage.CheckpointStore(url, key=key)``:
    to hand the store storage options or a filesystem of its own (the chaos
    workload routes its checkpoint I/O through a fault-injecting one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Sequence[Any],
        *,
        loss_fn: LossFn,
        global_batch_size: int,
        epochs: int = 1,
        max_steps: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        config: RuntimeConfig | None = None,
        on_step: Callable[[int, float], None] | None = None,
        grad_shards: int | None = None,
        checkpoint_store_factory: Callable[..., CheckpointStore] | None = None,
    ) -> None:
        install_exit_hook()  # an ElasticError escaping the script: one line, no traceback
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if grad_shards is not None and not 1 <= grad_shards <= global_batch_size:
            raise ConfigError(
                f"grad_shards must be between 1 and global_batch_size ({global_batch_size}), "
                f"got {grad_shards}"
            )
        self.grad_shards = grad_shards
        self.config = config or RuntimeConfig.from_env()
        self.device = local_device()
        self.model = model.to(self.device)
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.collate_fn = collate_fn
        self.seed = seed
        self.on_step = on_step
        sampler = ElasticSampler(
            len(dataset), global_batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last
        )
        self.total_steps = epochs * sampler.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self.state = TrainState(model=self.model, optimizer=optimizer, sampler=sampler)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._leave = threading.Event()
        self._last_loss: float | None = None
        self._checkpoint_store_factory = checkpoint_store_factory
        self._checkpoints: CheckpointStore | None = None
        self._pending_save = None
        self._pending_commits = False
        self.clock = StepClock(
            self.config.hangs,
            fallback_s=self.config.collective_timeout,
        )

    # -- setup / teardown ----------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        self.keys = Keyspace(cfg.job, cfg.etcd_prefix)
        self.events = EventLog(cfg.event_log, source=cfg.member_id, console=True)
        self.ledger = LedgerWriter(cfg.ledger_dir, cfg.member_id) if cfg.ledger_dir else None
        self.client = connect(cfg.etcd)
        self.store_host = StoreHost(cfg.advertise_host, timeout=cfg.collective_timeout)
        self.rdzv_config = cfg.rendezvous
        self.rdzv = self._join()
        if cfg.checkpoint:
            from storage import CheckpointStore, load_key_file

            key = load_key_file(cfg.checkpoint_key_file) if cfg.checkpoint_key_file else None
            open_store = self._checkpoint_store_factory or CheckpointStore
            self._checkpoints = open_store(cfg.checkpoint, key=key)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM to one worker: leave the job at the next step boundary.
            signal.signal(signal.SIGTERM, lambda *_: self._leave.set())

    def _join(self) -> Rendezvous:
        member = Member(
            self.config.member_id, address=self.config.advertise_host, store=self.store_host.address
        )
        rdzv = Rendezvous(self.client, self.keys, member, self.rdzv_config).start()
        # The launcher revokes this lease the moment it sees the process die,
        # so survivors need not wait for the TTL.
        retry_call(
            lambda: self.client.put(
                self.keys.lease_of(member.id),
                str(rdzv.session.lease_id),
                lease=rdzv.session.lease_id,
            ),
            what="publishing the lease id",
            timeout=self.config.etcd.connect_timeout,
        )
        return rdzv

    def _teardown(self) -> None:
        for closer in (
            lambda: self._finish_pending_save(raise_errors=False),
            lambda: self.rdzv.close(),
            lambda: self.client.close(),
            lambda: self.ledger and self.ledger.close(),
            lambda: self.events.close(),
        ):
            try:
                closer()
            except Exception as exc:  # teardown must reach every resource
                log.debug("teardown: %r", exc)

    # -- the loop -------------------------------------------------------------

    def fit(self) -> FitResult:
        self._setup()
        try:
            return self._run()
        finally:
            self._teardown()

    def _run(self) -> FitResult:
        cfg = self.config
        gen = 0
        failed_at: float | None = None
        while True:
            try:
                world = self.rdzv.next_world(after=gen, timeout=cfg.join_timeout)
            except SessionLostError:
                # A zombie (frozen past its TTL) or an etcd outage longer than
                # the TTL: our keys are gone. Register again under a new lease
                # and wait for a World newer than the last one we saw (the old
                # record still lists us), asking for it in case nobody else
                # will (after an outage every member is in the same spot).
                self.events.emit(Event.REJOIN, f"{cfg.member_id}: lease lost, rejoining", gen=gen)
                self.rdzv.close()
                self.rdzv = self._rejoin()
                self._request_reform(gen, broken=True)
                continue
            except RendezvousTimeoutError:
                world = self.rdzv.current()
                if world is not None and world.size >= cfg.rendezvous.max_workers:
                    continue  # a standby: the job is full and running; keep waiting
                raise
            except JobEnded as ended:
                outcome = "finished" if ended.reason == "finished" else "stopped"
                return self._result(outcome, gen)
            rank = world.rank_of(cfg.member_id)
            group = WorkerGroup(
                world,
                rank,
                self.store_host,
                timeout=cfg.collective_timeout,
                watch=lambda _waited, g=world.generation: self.rdzv.world_broken(g),
            )
            self.clock.reset()
            t_form = time.monotonic()
            try:
                group.form()
                restored = self._ensure_state(group)
                src = self.state.sync(group)
                gen = world.generation
                if rank == 0:
                    self.events.emit(
                        Event.GENERATION,
                        f"generation {gen}: {world.size} worker(s) {list(world.ids)} at step "
                        f"{self.state.step}"
                        + (f", state from rank {src}" if src is not None else "")
                        + (", restored from checkpoint" if restored else ""),
                        gen=gen,
                        world=list(world.ids),
                        step=self.state.step,
                        form_s=round(time.monotonic() - t_form, 4),
                        src=src,
                        total_steps=self.total_steps,
                        global_batch=self.state.sampler.global_batch_size,
                    )
                outcome = self._train(group, failed_at)
                failed_at = None
            except WorkerGroupError as exc:
                failed_at = failed_at or time.monotonic()
                gen = world.generation
                self.events.emit(
                    Event.FAILURE,
                    f"rank {rank} of generation {gen}: {exc}",
                    gen=gen,
                    rank=rank,
                    step=self.state.step,
                    **error_fields(exc),
                )
                self._request_reform(gen, broken=True)
                continue
            finally:
                group.close()
            if outcome == "reform":
                failed_at = time.monotonic()
                continue
            return self._result(outcome, gen)

    def _result(self, outcome: str, gen: int) -> FitResult:
        final = (
            outcome == "finished" and self.state.has_state and self.state.step >= self.total_steps
        )
        return FitResult(outcome, self.state.step, gen, self._last_loss, final)

    def _rejoin(self) -> Rendezvous:
        """Register again; while etcd is out of reach (a partition), keep trying
        with backoff for up to ``etcd_outage``: the network may heal."""
        deadline = time.monotonic() + min(self.config.join_timeout, self.config.etcd_outage)
        pause = 0.5
        while True:
            try:
                return self._join()
            except EtcdUnavailableError as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("rejoining: etcd out of reach (%s); retrying in %.1fs", exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _request_reform(self, gen: int, broken: bool = False) -> None:
        try:
            self.rdzv.request_reform(gen, broken=broken)
        except (EtcdUnavailableError, SessionLostError) as exc:
            # Not fatal: the leader also re-forms when it sees a member gone,
            # and next_world reports a lost session.
            log.warning("could not request a re-form of generation %d: %s", gen, exc)

    def _ensure_state(self, group: WorkerGroup) -> bool:
        """Give rank 0 state when nobody has any: restore or take the fresh init."""
        has = group.all_gather_int(1 if self.state.has_state else 0)
        if any(has):
            return False
        if group.rank != 0:
            return False
        cfg = self.config
        # No live member has state: the job restarts as a whole. The launcher
        # refuses a fresh run on a location that already holds checkpoints
        # unless --resume was given, and claimed it for this launch, so a
        # checkpoint found here is ours while the claim still names us.
        if self._checkpoints is not None:
            from storage import LocationClaimedError

            _attach_claim(self._checkpoints, self.client, self.keys, cfg.etcd.connect_timeout)
            try:
                self._checkpoints.check_claim()
            except LocationClaimedError as exc:  # another launch owns it: not ours to load
                raise ElasticError(f"not restoring from {cfg.checkpoint}: {exc}") from exc
        if self._checkpoints is not None and self._checkpoints.latest() is not None:
            from storage import (
                CheckpointNotFoundError,
                CorruptCheckpointError,
                InvalidArgumentError,
            )

            try:
                loaded = self._checkpoints.load_checkpoint()
            except (CorruptCheckpointError, CheckpointNotFoundError, InvalidArgumentError) as exc:
                # No committed checkpoint verifies: a restarted worker would
                # read the same bytes and fail the same way.
                raise ConfigError(f"cannot restore from {cfg.checkpoint}: {exc}") from exc
            self.state.load_checkpoint_dict(loaded.state)
            self.events.emit(
                Event.RESTORE,
                f"restored step {loaded.step} from {cfg.checkpoint}",
                step=loaded.step,
            )
            return True
        # A fresh start: rank 0's initial parameters are broadcast by sync().
        self.state.has_state = True
        self.state.step = 0
        return False

    def _train(self, group: WorkerGroup, failed_at: float | None) -> str:
        state, sampler = self.state, self.state.sampler
        rank, size, gen = group.rank, group.size, group.generation
        while state.step < self.total_steps:
            if self.grad_shards:
                parts, b = sampler.micro_shards(rank, size, self.grad_shards)
            else:
                share, b = sampler.share(rank, size)
                parts = [share] if share else []
            self._reseed(self.seed * 7919 + state.step * 104_729 + rank)
            ids = [i for part in parts for i in part]
            pieces, local_loss = self._local_gradient(parts, b)
            flat = self._pack(pieces, local_loss, gen)
            if self.ledger is not None:
                self.ledger.record(
                    step=state.step,
                    epoch=sampler.epoch,
                    generation=gen,
                    rank=rank,
                    world_size=size,
                    ids=ids,
                )
            # raises WorkerGroupError: nothing applied
            group.all_reduce(flat, watch=self._step_watch(group, state.step))
            self._unpack(flat)
            state.optimizer.step()
            state.step += 1
            sampler.advance()
            self.clock.mark()
            control = flat[-_N_CONTROL:].tolist()
            self._last_loss = control[_LOSS] / b
            if rank == 0:
                self.events.emit(
                    Event.STEP, None, step=state.step, gen=gen, world=size, loss=self._last_loss
                )
                if failed_at is not None:
                    took = time.monotonic() - failed_at
                    self.events.emit(
                        Event.RECOVERED,
                        f"recovered in {took:.3f}s at step {state.step} with {size} worker(s)",
                        seconds=round(took, 4),
                        step=state.step,
                        gen=gen,
                    )
            failed_at = None
            if self._pending_save is not None and self._pending_save.done():
                self._finish_pending_save(raise_errors=False)
            if self.on_step is not None:
                self.on_step(state.step, self._last_loss)
            if control[_FLAG_STOP] > 0:
                self._checkpoint(group, final=True)
                return "stopped"
            if self._due(state.step):
                self._checkpoint(group, final=False)
            if control[_FLAG_LEAVE] > 0:
                if self._leave.is_set():
                    self.events.emit(
                        Event.LEAVE,
                        f"{self.config.member_id} left at step {state.step}",
                        step=state.step,
                        gen=gen,
                    )
                    return "left"
                return "reform"
            if control[_FLAG_REFORM] > 0:
                return "reform"
        self._checkpoint(group, final=True)
        if rank == 0:
            retry_call(
                lambda: self.client.put(self.keys.done, str(state.step)),
                what="marking the job finished",
                timeout=self.config.etcd.connect_timeout,
            )
            self.events.emit(
                Event.FINISHED,
                f"training finished at step {state.step}",
                step=state.step,
                gen=gen,
                loss=self._last_loss,
            )
        return "finished"

    def _step_watch(self, group: WorkerGroup, step: int) -> HangWatch:
        gen = group.generation
        return HangWatch(
            client=self.client,
            keys=self.keys,
            lease_id=self.rdzv.session.lease_id,
            member_id=self.config.member_id,
            world=group.world,
            step=step,
            # Judged before the collective times out: a timed-out collective
            # re-forms, and the rendezvous then waits for the hung rank, whose
            # lease is alive (seen with --collective-timeout below the floor).
            bound_s=min(self.clock.bound(), 0.9 * self.config.collective_timeout),
            broken=lambda: self.rdzv.world_broken(gen),
            on_evict=lambda hung, why: self.events.emit(
                Event.EVICT,
                f"evicted {', '.join(hung)}: {why}",
                members=hung,
                step=step,
                gen=gen,
                reason=why,
            ),
        )

    def _due(self, step: int) -> bool:
        every = self.config.checkpoint_every
        # The last step is saved by the final (synchronous) checkpoint.
        return (
            self._checkpoints is not None
            and every > 0
            and step % every == 0
            and step < self.total_steps
        )

    # -- gradient + control packing --------------------------------------------

    def _reseed(self, seed: int) -> None:
        # Not torch.manual_seed: with CUDA uninitialised it queues a lazy seed
        # call that records a stack trace each time (~2 ms per step).
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def _fetch(self, ids: list[int]) -> Any:
        # Batched fetching where the dataset supports it (torch's __getitems__
        # protocol; a TensorDataset is indexed in one go); else per sample.
        if self.collate_fn is default_collate and isinstance(self.dataset, TensorDataset):
            index = torch.tensor(ids)
            return [t[index] for t in self.dataset.tensors]
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return self.collate_fn(getitems(ids))
        return self.collate_fn([self.dataset[i] for i in ids])

    def _grad_pieces(self) -> list[torch.Tensor]:
        return [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in self._params
        ]

    def _local_gradient(self, parts: list[list[int]], b: int) -> tuple[list[torch.Tensor], float]:
        """This rank's gradient contribution (weighted by share / b), as pieces
        to concatenate, and the sum of its per-sample losses."""
        exact = self.grad_shards is not None
        total: torch.Tensor | None = None
        pieces: list[torch.Tensor] = []
        local_loss = 0.0
        for ids in parts:
            for p in self._params:
                p.grad = None
            batch = _to_device(self._fetch(ids), self.device)
            loss = self.loss_fn(self.model, batch)
            (loss * (len(ids) / b)).backward()
            local_loss += float(loss.detach()) * len(ids)
            if not exact:
                pieces = self._grad_pieces()  # one share per rank: no extra copy
                continue
            # A sum of a few float32 values is exact in float64, so the order
            # in which ranks and micro-batches are added is irrelevant.
            flat = torch.cat(self._grad_pieces()).double()
            total = flat if total is None else total.add_(flat)
        if total is not None:
            pieces = [total]
        if not pieces:
            dtype = torch.float64 if exact else self._params[0].dtype
            pieces = [
                torch.zeros(sum(p.numel() for p in self._params), dtype=dtype, device=self.device)
            ]
        return pieces, local_loss

    def _pack(self, pieces: list[torch.Tensor], local_loss: float, gen: int) -> torch.Tensor:
        """Gradient and control flags in one buffer: one all-reduce per step."""
        rdzv = self.rdzv
        reform = rdzv.session.lost.is_set() or rdzv.reform_pending(gen)
        control = torch.tensor(
            [float(reform), float(rdzv.job_flag("stop")), float(self._leave.is_set()), local_loss],
            dtype=pieces[0].dtype,
            device=pieces[0].device,
        )
        return torch.cat([*pieces, control])

    def _unpack(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            # flat is fresh every step, so a view is safe when dtypes match.
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    # -- checkpoints --------------------------------------------------------------

    def _finish_pending_save(self, raise_errors: bool) -> None:
        handle, self._pending_save = self._pending_save, None
        if handle is None:
            return
        try:
            info = handle.wait(timeout=self.config.checkpoint_timeout)
        except Exception as exc:
            self.events.emit(
                Event.CHECKPOINT_FAILED, f"checkpoint failed: {exc}", **error_fields(exc)
            )
            if raise_errors:
                raise
            return
        if self._pending_commits:
            self.events.emit(
                Event.CHECKPOINT_COMMITTED, f"checkpoint step {info.step} committed", step=info.step
            )

    def _checkpoint(self, group: WorkerGroup, final: bool) -> None:
        if self._checkpoints is None:
            return
        step, gen = self.state.step, group.generation
        fence = self.rdzv.commit_fence(gen) if group.rank == 0 else None
        kwargs = dict(
            rank=group.rank,
            world_size=group.size,
            generation=gen,
            fence=fence,
            timeout=self.config.checkpoint_timeout,
            # Once a newer generation exists the fence refuses this
            # commit, and a dead rank's part never comes: stop waiting.
            abandon=lambda: self.rdzv.generation() > gen,
        )
        if group.rank == 0:
            _attach_claim(
                self._checkpoints, self.client, self.keys, self.config.etcd.connect_timeout
            )
        self._finish_pending_save(raise_errors=False)
        t0 = time.monotonic()
        if final:
            from storage import CheckpointExistsError, StorageError

            state = self.state.checkpoint_dict()
            try:
                info = self._checkpoints.save(step, state, **kwargs)
            except CheckpointExistsError as exc:
                # Committed already, by an earlier life of this job that was resumed
                # after that commit -- but only if that commit verifies and holds
                # exactly this state; anything else (another job's step) would be
                # this run's final checkpoint silently lost. Rank 0 decides.
                why = f"{exc}, and that commit does not hold this run's final state"
                try:
                    if group.rank != 0 or self._checkpoints.holds(step, state):
                        return
                except StorageError as err:
                    why = f"{exc}, and that commit cannot be read back: {err}"
                self.events.emit(
                    Event.CHECKPOINT_FAILED,
                    f"final checkpoint at step {step} failed: {why}",
                    step=step,
                    error=why,
                    error_type=type(exc).__name__,
                )
                raise ElasticError(f"final checkpoint at step {step} failed: {why}") from exc
            except Exception as exc:
                self.events.emit(
                    Event.CHECKPOINT_FAILED,
                    f"final checkpoint at step {step} failed: {exc}",
                    step=step,
                    **error_fields(exc),
                )
                raise ElasticError(f"final checkpoint at step {step} failed: {exc}") from exc
            if group.rank == 0:
                self.events.emit(
                    Event.CHECKPOINT,
                    f"checkpoint step {step} committed ({time.monotonic() - t0:.2f}s)",
                    step=step,
                    gen=gen,
                    final=True,
                    info=str(info),
                )
        else:
            self._pending_save = self._checkpoints.save_async(
                step, self.state.checkpoint_dict(), **kwargs
            )
            self._pending_commits = group.rank == 0
            if group.rank == 0:
                self.events.emit(
                    Event.CHECKPOINT,
                    f"checkpoint step {step} started (blocked {time.monotonic() - t0:.3f}s)",
                    step=step,
                    gen=gen,
                    final=False,
                )


def _attach_claim(checkpoints: Any, client: Any, keys: Keyspace, timeout: float) -> None:
    """Commit only under the claim this job's launcher made (if it made one)."""
    if checkpoints.claim_instance is not None:
        return
    raw = retry_call(
        lambda: client.get(keys.claim)[0], what="reading the checkpoint claim", timeout=timeout
    )
    if raw is not None:
        checkpoints.attach_claim(raw.decode())


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
