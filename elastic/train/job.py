"""A script's own training loop, elastic: the one step protocol of the runtime.

::

    job = elastic.init()
    opt = job.optimizer(torch.optim.AdamW(model.parameters()), model)
    loader = job.loader(train_set, global_batch_size=256, num_workers=2)
    state = job.state(scheduler=sched, epoch=0)
    for batch in loader:
        loss = loss_fn(model, batch)
        opt.zero_grad(); loss.backward()
        job.clip_grad_norm_(1.0)
        opt.step(); sched.step()
        if job.every(100):
            metrics = job.evaluate(model, val_set, metric_fn)

Per step every rank computes the gradient of its share of the global batch.
The step's exchange is two collectives: a small header (what each rank is
doing, and the control flags: re-form due, stop requested, someone leaving)
and one all-reduce of the gradients, each weighted by its share of the global
batch, with the loss. The update is applied only after the exchange succeeded,
so a failed collective leaves the parameters at the last completed step: that
is the rollback (the light rest of the state is put back at the next step
boundary, see :mod:`.state`). Because the flags ride on every step's header,
every rank learns of a membership change after the same step and they all
switch generation together.

Step boundaries are the loader's ``next()``: there the job re-forms, syncs
state, leaves, stops and checkpoints. After a new World forms, ranks agree on
the newest step any of them holds and one holder broadcasts it (joiners get
state from peers). Storage is read only when no live rank has state: a
whole-job restart with ``resume``.

Started without ``elastic run`` (``python train.py``) the job is one worker
with an embedded etcd of its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import default_collate

from storage.shards import META_KEY as _SHARDS_META_KEY
from storage.shards import SHARDS_KEY as _SHARDS_KEY

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
from ..coord.etcd import EmbeddedEtcd, connect, retry_call
from ..coord.hangs import HangWatch, StepClock
from ..coord.keys import Keyspace
from ..coord.membership import Member
from ..coord.rendezvous import Rendezvous, RendezvousConfig
from .config import CONFIG_ENV, RuntimeConfig
from .exithook import install_exit_hook
from .grads import StepGradients
from .group import StoreHost, WorkerGroup, local_device
from .ledger import LedgerWriter
from .livesync import LiveSync, live_sync, wants_live
from .loader import ElasticLoader, Part, plan
from .optim import ElasticOptimizer
from .sharded import ShardedState, assemble
from .state import JobState

if TYPE_CHECKING:
    from storage import CheckpointStore

log = logging.getLogger(__name__)

# What a rank is doing at a collective of its loop, exchanged in every header:
# ranks that disagree (evaluate() called by some ranks only) are told so.
_STEP, _EVAL, _APPLY = 1.0, 2.0, 3.0
_KIND_NAMES = {
    _STEP: "the optimizer step",
    _EVAL: "evaluate()",
    _APPLY: "optimizer.step() (the sharded update)",
}
_H_KIND, _H_NEG_KIND, _H_REFORM, _H_STOP, _H_LEAVE = range(5)


class Job:
    """One worker's membership of an elastic job, and the step protocol of its loop."""

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        *,
        seed: int = 0,
        checkpoint_store_factory: Callable[..., CheckpointStore] | None = None,
        on_step: Callable[[int, float | None], None] | None = None,
    ) -> None:
        install_exit_hook()  # an ElasticError escaping the script: one line, no traceback
        self._etcd_server: EmbeddedEtcd | None = None
        if config is None:
            config = self._config_from_env_or_alone()
        self.config = config
        self.seed = seed
        self.on_step = on_step
        self.device = local_device()
        self.registry = JobState()
        self.group: WorkerGroup | None = None
        self.outcome: str | None = None  # "finished", "stopped" or "left"
        self.loss: float | None = None  # the last committed step's global mean loss
        self._optimizers: list[ElasticOptimizer] = []
        self._loader: ElasticLoader | None = None
        self._params: list[torch.nn.Parameter] | None = None
        self._phase = "idle"  # idle | open | reduced (sharded) | synced | failed
        self._sharded: ShardedState | None = None  # --shard-state: this rank's shards
        self._grad_loss = 0.0
        self._gen = 0
        self._failed_at: float | None = None
        self._snapshot: dict[str, Any] | None = None
        self._parts: list[Part] = []
        self._taken = self._folded = 0
        self._grads: StepGradients | None = None  # built at the first step
        self._opened = False  # this step's header was exchanged
        self._watch: Any = None  # this step's hang watch
        self._live: LiveSync | None = None  # a live join's transfers, until its first update
        self._live_failed = False  # this rank's last live join failed: the next one waits
        # All-reduce gradient buckets during the last micro-batch's backward
        # (grads.py); off for a loop that runs backward twice per micro-batch.
        self.overlap = True
        self._local_loss = 0.0
        self._flags: list[float] = []
        self._leave = threading.Event()
        self._checkpoint_store_factory = checkpoint_store_factory
        self._checkpoints: CheckpointStore | None = None
        self._pending_save: Any = None
        self._pending_commits = False
        self._closed = False
        self.clock = StepClock(self.config.hangs, fallback_s=self.config.collective_timeout)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    def _config_from_env_or_alone(self) -> RuntimeConfig:
        if os.environ.get(CONFIG_ENV):
            return RuntimeConfig.from_env()
        # `python train.py`: a one-worker job on an etcd of its own.
        # die_with_parent: a script killed mid-run leaves no etcd server behind.
        self._etcd_server = EmbeddedEtcd(die_with_parent=True).start()
        return RuntimeConfig(
            job=f"alone-{os.getpid()}",
            member_id="w0",
            etcd=self._etcd_server.url,
            rendezvous=RendezvousConfig(min_workers=1, max_workers=1, settle_s=0.0),
        )

    # -- setup / teardown ----------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        self.keys = Keyspace(cfg.job, cfg.etcd_prefix)
        self.events = EventLog(cfg.event_log, source=cfg.member_id, console=True)
        self.ledger = LedgerWriter(cfg.ledger_dir, cfg.member_id) if cfg.ledger_dir else None
        self.val_ledger = (
            LedgerWriter(cfg.ledger_dir, cfg.member_id, kind="val") if cfg.ledger_dir else None
        )
        self.client = connect(cfg.etcd)
        self.store_host = StoreHost(cfg.advertise_host, timeout=cfg.collective_timeout)
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
            self.config.member_id,
            address=self.config.advertise_host,
            store=self.store_host.address,
            meta={"role": self.config.role},
        )
        rdzv = Rendezvous(
            self.client,
            self.keys,
            member,
            self.config.rendezvous,
            on_evict=lambda m, why: self.events.emit(
                Event.EVICT, f"evicted {m}: {why}", members=[m], reason=why
            ),
        ).start()
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

    def close(self) -> None:
        """Leave the job and release everything (idempotent; also run at exit)."""
        if self._closed:
            return
        self._closed = True
        for closer in (
            lambda: self._loader and self._loader.drop(),
            lambda: self._finish_pending_save(raise_errors=False),
            lambda: self._close_group(),
            lambda: self.rdzv.close(),
            lambda: self.client.close(),
            lambda: self.ledger and self.ledger.close(),
            lambda: self.val_ledger and self.val_ledger.close(),
            lambda: self.events.close(),
            lambda: self._etcd_server and self._etcd_server.stop(),
        ):
            try:
                closer()
            except Exception as exc:  # teardown must reach every resource
                log.debug("teardown: %r", exc)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- what the script registers --------------------------------------------

    def optimizer(
        self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
    ) -> ElasticOptimizer:
        """Wrap ``optimizer``: its step applies the gradient averaged over the
        global batch, on every rank or on none. ``model`` (and the optimizer)
        become part of the state under the names "model" and "optimizer"
        unless :meth:`state` names them otherwise."""
        if self._params is not None:
            raise ConfigError("job.optimizer() after training started: wrap every optimizer first")
        wrapped = ElasticOptimizer(self, optimizer)
        self._optimizers.append(wrapped)
        if model is not None:
            model.to(self.device)
            self.registry.register_default("model", model)
            covered = {id(p) for w in self._optimizers for p in w.params}
            if all(id(p) in covered for p in model.parameters() if p.requires_grad):
                self.registry.mark_committed_only(model)
        self.registry.register_default("optimizer", optimizer)
        return wrapped

    def loader(self, dataset: Any, *, global_batch_size: int, **options: Any) -> ElasticLoader:
        """This rank's share of each global batch (options: see ElasticLoader)."""
        options.setdefault("seed", self.seed)
        return ElasticLoader(self, dataset, global_batch_size=global_batch_size, **options)

    def attach_loader(self, loader: ElasticLoader) -> None:
        if self._loader is not None:
            raise ConfigError("a job has one loader (its cursor is the job's progress)")
        self._loader = loader
        self.registry.set_sampler(loader.sampler)

    def state(self, **entries: Any) -> JobState:
        """Register what must survive a failure (objects with state_dict, plain values)."""
        if self._params is not None:
            raise ConfigError("job.state() after training started: register state first")
        unwrapped = {
            k: (v.optimizer if isinstance(v, ElasticOptimizer) else v) for k, v in entries.items()
        }
        for obj in unwrapped.values():
            if isinstance(obj, torch.nn.Module):
                obj.to(self.device)
        return self.registry.register(**unwrapped)

    # -- where the script is ----------------------------------------------------

    @property
    def step(self) -> int:
        """Committed steps."""
        return self.registry.step

    @property
    def rank(self) -> int:
        return self.group.rank if self.group is not None else 0

    @property
    def world_size(self) -> int:
        return self.group.size if self.group is not None else 1

    @property
    def total_steps(self) -> int:
        if self._loader is None:
            raise ConfigError("no loader: create one with job.loader(dataset, ...)")
        return self._loader.total_steps

    @property
    def final(self) -> bool:
        """True on a worker that holds the job's final state (it trained to the
        last step); a worker that joined a finished job must not publish its
        untrained parameters."""
        return (
            self.outcome == "finished"
            and self.registry.has_state
            and self.registry.step >= self.total_steps
        )

    @property
    def exit_code(self) -> int:
        return {"finished": EXIT_FINISHED, "left": EXIT_LEFT}.get(self.outcome or "", EXIT_STOPPED)

    def every(self, k: int) -> bool:
        """True right after a committed step whose number is a multiple of ``k``
        (the same answer on every rank)."""
        if k < 1:
            raise ConfigError(f"every(k) needs k >= 1, got {k}")
        return self._phase == "synced" and self.registry.step % k == 0

    def report_loss(self, loss: torch.Tensor | float) -> None:
        """The mean loss of the batch (or micro-batch) just computed: the job
        reports the global batch's mean (``job.loss``, the step events)."""
        if self._parts and self._taken:
            part = self._parts[self._taken - 1]
            if part.weight > 0:
                self._local_loss += float(loss) * len(part.ids)

    # -- step boundaries -----------------------------------------------------------

    def begin_step(self) -> list[Part] | None:
        """Finish the last step and start the next; None when training is over."""
        if self._loader is None:
            raise ConfigError("no loader: create one with job.loader(dataset, ...)")
        if not self._optimizers:
            raise ConfigError("no optimizer: wrap it with job.optimizer(optimizer, model)")
        if self._phase == "open":
            # The body did not step (a GradScaler skip, or no step at all): the
            # exchange still runs, so every rank takes part in it alike.
            self.sync_gradients()
        if self._phase == "reduced":
            # Sharded, and the body did not call optimizer.step() (a
            # GradScaler skip: the same decision on every rank, from the
            # averaged gradient): the step counts, nothing is applied.
            self._commit()
        if self._phase == "synced":
            self._after_commit()
        elif self._phase == "failed":
            self._after_failure()
        self._phase = "idle"
        while True:
            if self.outcome is not None:
                self._close_group()
                return None
            if self.group is None:
                self._form()
                continue
            if self.registry.step >= self.total_steps:
                self._finish()
                return None
            break
        self._snapshot = self.registry.light_snapshot()
        self._reseed(self.seed * 7919 + self.registry.step * 104_729 + self.group.rank)
        self._parts = plan(
            self.registry.sampler,
            self.group.rank,
            self.group.size,
            self._loader.micro,
            self.catchup_holders(),
        )
        self._taken = self._folded = 0
        self._opened = False
        self._step_grads().begin()
        self._local_loss = 0.0
        self._phase = "open"
        return self._parts

    def catchup_holders(self) -> list[int] | None:
        """The ranks that train this step alone: a live join's first step, while
        the joiners receive the state (livesync.py); else None."""
        live = self._live
        if live is None or live.done or self.registry.step != live.step:
            return self.compute_ranks()
        return live.holders

    def compute_ranks(self) -> list[int] | None:
        """The ranks that compute gradients: the workers when the World also
        holds servers (--servers); None (every rank) otherwise, and when only
        servers are left (they compute then, so the job goes on)."""
        world = self.group.world if self.group is not None else None
        if world is None or not world.servers or len(world.servers) == world.size:
            return None
        return [r for r in range(world.size) if r not in world.servers]

    def _finish_live(self) -> None:
        """Wait for a live join's transfers (before any update of its first
        step, or a joiner's first forward). WorkerGroupError when one failed."""
        live, self._live = self._live, None
        if live is None:
            return
        try:
            moved, took = live.finish(self._watch)
        except WorkerGroupError:
            self._live_failed = True
            raise
        if live.joining:
            peers = len(live.holders)
            rate = moved / took if took > 0 else 0.0
            self.events.emit(
                Event.JOINED,
                f"joined: {_size(moved)} from {peers} peer(s) in {took:.2f} s ({_size(rate)}/s)",
                gen=live.group.generation,
                step=live.step,
                bytes=moved,
                seconds=round(took, 4),
                peers=peers,
            )

    def set_part(self, i: int) -> None:
        """The loader hands out the step's part ``i`` (its batch or micro-batch)."""
        self._taken = i + 1
        if self._live is not None and self._live.joining and self._phase == "open":
            # A joiner's weight-0 sample: computed on its state, once that is in.
            try:
                self._finish_live()
            except WorkerGroupError as exc:
                self._step_grads().failed()
                self._on_failure(exc)
        grads = self._step_grads()
        grads.prepare(self._parts[i].weight)
        if i == len(self._parts) - 1 and self._phase == "open":
            # The last part: agree on the step now, so that its backward can
            # all-reduce gradient buckets as they fill (grads.py).
            if self._open_exchange() and self.overlap:
                grads.overlap(self.group.start_all_reduce)

    def fold_micro_batch(self) -> None:
        """Add the gradient of the micro-batch just computed to the step's sum."""
        while self._folded < self._taken:
            self._step_grads().fold(self._parts[self._folded].weight)
            self._folded += 1

    def _step_grads(self) -> StepGradients:
        if self._grads is None:
            exact = self._loader is not None and self._loader.exact
            self._grads = StepGradients(self._train_params(), exact=exact, device=self.device)
        return self._grads

    def zero_grad(self, wrapped: ElasticOptimizer, set_to_none: bool) -> None:
        """``wrapped.zero_grad()``: gradients bound to the step's buffer are
        zeroed in place (they stay views of it); others as torch does."""
        rest = self._grads.zero(wrapped.params) if self._grads is not None else wrapped.params
        for p in rest:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def _train_params(self) -> list[torch.nn.Parameter]:
        if self._params is None:
            seen: set[int] = set()
            params = []
            for w in self._optimizers:
                for p in w.params:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
            if not params:
                raise ConfigError("the wrapped optimizers hold no parameter that requires grad")
            self._params = params
        return self._params

    def sync_gradients(self) -> bool:
        """The step's gradient exchange (once per step); False when it failed here."""
        if self._phase in ("synced", "reduced"):
            return True
        if self._phase == "failed":
            return False
        if self._phase != "open" or self.group is None:
            raise ConfigError(
                "optimizer.step() outside the loader's loop: take each step's batch from "
                "job.loader(...) first"
            )
        scalers = self.registry.objects_of(torch.amp.GradScaler)
        for w in self._optimizers:
            w.check_params()
            for scaler in scalers:
                w.check_scaler(scaler)
        if self._taken < len(self._parts):
            if self._loader is not None and self._loader.micro is None and not self._taken:
                raise ConfigError("optimizer.step() before the loader handed out the step's batch")
            raise ConfigError(
                f"the step used {self._taken} of its {len(self._parts)} micro-batches: "
                "compute every micro-batch the loader yields before optimizer.step()"
            )
        self.fold_micro_batch()
        if not self._opened and not self._open_exchange():
            return False
        grads, group = self._step_grads(), self.group
        try:
            # No micro-batch for this rank (more ranks than micro-batches): zeros.
            started = grads.exchange(
                self._local_loss, bool(self._parts), launch=group.start_all_reduce
            )
            for handle in started:
                group.finish(handle, watch=self._watch)
            # Nothing is updated before a live join's state is sent and in.
            self._finish_live()
        except WorkerGroupError as exc:
            grads.failed()
            self._on_failure(exc)
            return False
        grads.averaged()
        self._grad_loss = float(grads.buf[-1])
        if self._sharded is not None:
            # Committed at the optimizer step's own header (sharded_step).
            self._phase = "reduced"
            return True
        self._commit()
        return True

    def _commit(self) -> None:
        state = self.registry
        self.loss = self._grad_loss / len(state.sampler.global_batch())
        state.step += 1
        state.sampler.advance()
        self.clock.mark()
        if self._sharded is not None:
            self._sharded.step = state.step
        self._phase = "synced"

    @property
    def sharded(self) -> bool:
        return self._sharded is not None

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (tensors) this rank holds: with
        --shard-state its shards only, about K/W of the replicated size."""
        if self._sharded is not None:
            return self._sharded.state_bytes()
        return sum(
            v.numel() * v.element_size()
            for w in self._optimizers
            for st in w.optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )

    def sharded_step(self) -> None:
        """``optimizer.step()`` with sharded state (sharded.py): the commit
        header, this rank's shards updated, the parameters exchanged."""
        sh, group = self._sharded, self.group
        try:
            self._header(_APPLY, self._watch)
        except WorkerGroupError as exc:
            # Perhaps committed elsewhere: the gradient is kept for a roll-forward.
            sh.keep_gradient()
            self._on_failure(exc)
            return
        self._commit()
        sh.apply()
        try:
            sh.exchange_params(group, sh.step_sources(sh.owners), watch=self._watch)
        except WorkerGroupError as exc:
            # The step is committed; the next World puts the parameters right.
            sh.stale = True
            self._report_failure(exc, group.rank, group.generation, " (parameter exchange)")

    def _open_exchange(self) -> bool:
        """The step's ledger line and header (once per step, before any of its
        gradient leaves); False when the header failed."""
        self._opened = True
        group, state = self.group, self.registry
        if self.ledger is not None:
            # Before anything is sent: a rank that dies after contributing has logged.
            self.ledger.record(
                step=state.step,
                epoch=state.sampler.epoch,
                generation=group.generation,
                rank=group.rank,
                world_size=group.size,
                ids=[i for part in self._parts if part.weight > 0 for i in part.ids],
            )
        self._watch = self._step_watch(group, state.step)
        try:
            self._flags = self._header(_STEP, self._watch)
        except WorkerGroupError as exc:
            self._step_grads().failed()
            self._on_failure(exc)
            return False
        return True

    def _header(self, kind: float, watch: Any = None) -> list[float]:
        rdzv, gen = self.rdzv, self.group.generation
        reform = rdzv.session.lost.is_set() or rdzv.reform_pending(gen)
        flags = torch.tensor(
            [kind, -kind, float(reform), float(rdzv.job_flag("stop")), float(self._leave.is_set())],
            dtype=torch.float64,
        )
        self.group.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, watch=watch)
        out = flags.tolist()
        if out[_H_KIND] != -out[_H_NEG_KIND]:
            raise ConfigError(
                f"ranks disagree at step {self.registry.step}: some called "
                f"{_KIND_NAMES[out[_H_KIND]]}, others {_KIND_NAMES[-out[_H_NEG_KIND]]} "
                "(evaluate() must be called by every rank, e.g. under job.every(k))"
            )
        return out

    def _on_failure(self, exc: WorkerGroupError) -> None:
        self._report_failure(exc, self.group.rank, self.group.generation)
        self._phase = "failed"

    def _report_failure(self, exc: WorkerGroupError, rank: int, gen: int, where: str = "") -> None:
        """One failed collective of generation ``gen``: record it and ask for a new World."""
        self._failed_at = self._failed_at or time.monotonic()
        self.events.emit(
            Event.FAILURE,
            f"rank {rank} of generation {gen}{where}: {exc}",
            gen=gen,
            rank=rank,
            step=self.registry.step,
            **error_fields(exc),
        )
        self._request_reform(gen, broken=True)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradient by its global norm (the same on every rank)."""
        if not self.sync_gradients():
            return torch.tensor(float("nan"))
        return torch.nn.utils.clip_grad_norm_(self._train_params(), max_norm, norm_type=norm_type)

    def _after_commit(self) -> None:
        state, group = self.registry, self.group
        gen, size = group.generation, group.size
        flags = self._flags
        if group.rank == 0:
            self.events.emit(Event.STEP, None, step=state.step, gen=gen, world=size, loss=self.loss)
            if self._failed_at is not None:
                took = time.monotonic() - self._failed_at
                self.events.emit(
                    Event.RECOVERED,
                    f"recovered in {took:.3f}s at step {state.step} with {size} worker(s)",
                    seconds=round(took, 4),
                    step=state.step,
                    gen=gen,
                )
        self._failed_at = None
        if self._pending_save is not None and self._pending_save.done():
            self._finish_pending_save(raise_errors=False)
        if self.on_step is not None:
            self.on_step(state.step, self.loss)
        if self._sharded is not None and self._sharded.stale:
            self._reform()  # before any checkpoint: some parameters are not in yet
            return
        if flags[_H_STOP] > 0:
            self._checkpoint(final=True)
            self.outcome = "stopped"
            return
        if self._due(state.step):
            self._checkpoint(final=False)
        if flags[_H_LEAVE] > 0:
            if self._leave.is_set():
                self.events.emit(
                    Event.LEAVE,
                    f"{self.config.member_id} left at step {state.step}",
                    step=state.step,
                    gen=gen,
                )
                self.outcome = "left"
                return
            self._reform()
            return
        if flags[_H_REFORM] > 0:
            self._reform()

    def _reform(self) -> None:
        self._failed_at = time.monotonic()
        self._close_group()

    def _after_failure(self) -> None:
        if self._snapshot is not None:
            self.registry.restore_light(self._snapshot)
        self._close_group()

    def _close_group(self) -> None:
        group, self.group = self.group, None
        self._live = None  # its transfers are parked with the group's
        if self._loader is not None:
            self._loader.drop()
        if group is not None:
            group.close()

    def _finish(self) -> None:
        state, group = self.registry, self.group
        self._checkpoint(final=True)
        if group.rank == 0:
            retry_call(
                lambda: self.client.put(self.keys.done, str(state.step)),
                what="marking the job finished",
                timeout=self.config.etcd.connect_timeout,
            )
            self.events.emit(
                Event.FINISHED,
                f"training finished at step {state.step}",
                step=state.step,
                gen=group.generation,
                loss=self.loss,
            )
        self.outcome = "finished"

    # -- forming a World --------------------------------------------------------------

    def _form(self) -> None:
        """Wait for the next World and join its process group; sets ``group``
        or ``outcome`` (the job ended), or returns without either to retry."""
        cfg = self.config
        gen = self._gen
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
            return
        except RendezvousTimeoutError:
            world = self.rdzv.current()
            if world is not None and world.size >= cfg.rendezvous.max_workers:
                return  # a standby: the job is full and running; keep waiting
            raise
        except JobEnded as ended:
            self.outcome = "finished" if ended.reason == "finished" else "stopped"
            return
        rank = world.rank_of(cfg.member_id)
        if cfg.shard_state and self._sharded is None:
            self._sharded = self._make_sharded()
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
            missing = self.rdzv.await_members(
                world,
                timeout=cfg.collective_timeout,
                # The step's hang bound: a member alive but not here (its
                # training thread hung) is evicted, not waited for.
                hang_bound_s=min(self.clock.bound(), 0.9 * cfg.collective_timeout),
            )
            if missing is not None:
                raise WorkerGroupError(
                    f"forming generation {world.generation} (rank {rank}/{world.size}): {missing}"
                )
            group.form()
            restored = self._ensure_state(group)
            resharded = self._reshard(group, world) if self._sharded is not None else None
            steps = self.registry.gather_steps(group)
            live = None
            # Not at the last step: there is no next step to overlap with, and
            # the final checkpoint needs every rank's state at once.
            if (
                cfg.live_join
                and self._sharded is None  # shards move at the re-form (_reshard)
                and wants_live(steps)
                and max(steps) < self.total_steps
            ):
                # After a live join failed (a peer died mid-transfer, or the
                # transfer itself cannot work here), the next World waits for an
                # ordinary sync: a failure that repeats cannot loop.
                if not any(group.all_gather_int(int(self._live_failed))):
                    live = live_sync(self.registry, group, steps)
            self._live_failed = False
            src = live.holders[0] if live is not None else self.registry.sync(group, steps)
        except WorkerGroupError as exc:
            self._gen = world.generation
            self._report_failure(exc, rank, world.generation)
            group.close()
            return
        except BaseException:
            group.close()
            raise
        self._gen = world.generation
        self.group = group
        self._live = live
        paused = src is not None and live is None  # the World waited for a sync
        if rank == 0:
            self.events.emit(
                Event.GENERATION,
                f"generation {self._gen}: {world.size} worker(s) {list(world.ids)} at step "
                f"{self.registry.step}"
                + (
                    f", joiner(s) {live.joiners} receiving the state while the World trains"
                    if live is not None
                    else _synced(src, self.registry.last_sync)
                    if src is not None
                    else ""
                )
                + (", restored from checkpoint" if restored else "")
                + _resharded(resharded),
                gen=self._gen,
                world=list(world.ids),
                step=self.registry.step,
                form_s=round(time.monotonic() - t_form, 4),
                src=src,
                sync_bytes=self.registry.last_sync[0] if paused else 0,
                sync_s=round(self.registry.last_sync[1], 4) if paused else 0.0,
                live=live is not None,
                total_steps=self.total_steps,
                global_batch=self.registry.sampler.global_batch_size,
                **({"shards": resharded} if resharded is not None else {}),
            )

    # -- sharded state --------------------------------------------------------------------

    def _make_sharded(self) -> ShardedState:
        if len(self._optimizers) != 1:
            raise ConfigError(
                f"--shard-state shards one optimizer; this script wraps {len(self._optimizers)}"
            )
        cfg = self.config
        return ShardedState(self._optimizers[0].optimizer, replicas=cfg.replicas, shards=cfg.shards)

    def _reshard(self, group: WorkerGroup, world: Any) -> dict[str, Any]:
        """The new World's placement of the shards, reached by peer transfers
        (storage only when every copy of a shard died)."""
        members = [(m.id, m.address or m.id) for m in world.members]
        my_step = self.registry.step if self.registry.has_state else -1

        def restore(lost: list[int]) -> int | None:
            if self._checkpoints is None or self._checkpoints.latest() is None:
                return None
            loaded = self._checkpoints.load_checkpoint()
            self._load_checkpoint(loaded)
            if group.rank == 0:
                self.events.emit(
                    Event.RESTORE,
                    f"shard(s) {lost} lost every copy: restored step {loaded.step} from "
                    f"{self.config.checkpoint}",
                    step=loaded.step,
                    lost_shards=lost,
                )
            return loaded.step

        servers = [world.members[r].id for r in world.servers]
        out = self._sharded.reform(group, members, my_step, restore, owners=servers or None)
        if out["k"] < self.config.replicas and group.rank == 0:
            log.warning(
                "%d owner(s) in generation %d: %d cop(ies) of each shard instead of %d",
                len(servers) or group.size,
                world.generation,
                out["k"],
                self.config.replicas,
            )
        return out

    def _shards_meta(self) -> dict[str, Any]:
        opt = self._optimizers[0].optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        return {"optimizer": self.registry.name_of(opt), "shapes": [list(p.shape) for p in params]}

    def _load_checkpoint(self, loaded: Any) -> None:
        """A checkpoint into this rank's state, whichever way it was saved: a
        sharded one's parts assembled, a replicated one's state sliced."""
        state = dict(loaded.state)
        opt = self._optimizers[0].optimizer if len(self._optimizers) == 1 else None
        name = self.registry.name_of(opt) if opt is not None else None
        parts = [
            tree[_SHARDS_KEY] for _, tree in sorted(loaded.per_rank.items()) if _SHARDS_KEY in tree
        ]
        if parts and name is None:
            raise ConfigError(
                "the checkpoint holds sharded optimizer state, and this script does not "
                "wrap exactly one optimizer to load it into"
            )
        if name is not None and name in state:
            saved = dict(state[name])
            params = [p for g in opt.param_groups for p in g["params"]]
            full = assemble(parts, params) if parts else dict(saved.get("state", {}))
            if self._sharded is not None:
                saved["state"] = {}
                self._sharded.load_full(full, int(loaded.step))
            else:
                saved["state"] = full
            state[name] = saved
        self.registry.load_checkpoint_dict(state)

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
        has = group.all_gather_int(1 if self.registry.has_state else 0)
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
            self._load_checkpoint(loaded)
            self.events.emit(
                Event.RESTORE,
                f"restored step {loaded.step} from {cfg.checkpoint}",
                step=loaded.step,
            )
            return True
        # A fresh start: rank 0's initial parameters are broadcast by sync().
        self.registry.has_state = True
        self.registry.step = 0
        return False

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

    def _reseed(self, seed: int) -> None:
        # Not torch.manual_seed: with CUDA uninitialised it queues a lazy seed
        # call that records a stack trace each time (~2 ms per step).
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: Sequence[Any],
        metric_fn: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]],
        *,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
    ) -> dict[str, float]:
        """Evaluate ``model`` on ``dataset`` over the current World; every rank
        must call it (at the same step) and gets the same metrics.

        ``metric_fn(model, batch)`` returns sums over the batch (a summed loss,
        a count of correct answers); the result is each sum divided by the
        number of samples. The set is cut into fixed chunks of ``batch_size``
        whatever the World, each chunk is evaluated once, and the chunks' sums
        are added in chunk order, so the value does not depend on the world
        size. If a peer fails during the evaluation this rank evaluates the
        chunks it lacks itself (the same value), and the next step re-forms.
        """
        from .evaluate import run_evaluation

        return run_evaluation(self, model, dataset, metric_fn, batch_size, collate_fn)

    def _eval_header(self) -> None:
        """The evaluation's header: fails (WorkerGroupError) or refuses a mismatch."""
        self._finish_live()  # a joiner evaluates its state, not what is still arriving
        self._header(_EVAL)

    def _mark_broken(self, exc: WorkerGroupError) -> None:
        """A collective outside the step failed: the next step re-forms."""
        group = self.group
        if group is not None and self._phase in ("synced", "idle"):
            self._report_failure(exc, group.rank, group.generation, " (evaluate)")
            if self._phase == "synced":
                self._flags = list(self._flags)
                self._flags[_H_REFORM] = 1.0

    # -- checkpoints ----------------------------------------------------------------------

    def _due(self, step: int) -> bool:
        every = self.config.checkpoint_every
        # The last step is saved by the final (synchronous) checkpoint.
        return (
            self._checkpoints is not None
            and every > 0
            and step % every == 0
            and step < self.total_steps
        )

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

    def _checkpoint(self, final: bool) -> None:
        if self._checkpoints is None:
            return
        group = self.group
        step, gen = self.registry.step, group.generation
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
        if self._sharded is not None:
            # Each shard once, by its first owner (not once per copy).
            kwargs["per_rank_state"] = {
                _SHARDS_KEY: self._sharded.part(self.config.member_id),
                # So that `elastic ckpt export` can join the pieces without the script.
                _SHARDS_META_KEY: self._shards_meta(),
            }
        if group.rank == 0:
            _attach_claim(
                self._checkpoints, self.client, self.keys, self.config.etcd.connect_timeout
            )
        self._finish_pending_save(raise_errors=False)
        t0 = time.monotonic()
        if not final:
            self._pending_save = self._checkpoints.save_async(
                step, self.registry.checkpoint_dict(), **kwargs
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
            return
        from storage import CheckpointExistsError, StorageError

        state = self.registry.checkpoint_dict()
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


def _attach_claim(checkpoints: Any, client: Any, keys: Keyspace, timeout: float) -> None:
    """Commit only under the claim this job's launcher made (if it made one)."""
    if checkpoints.claim_instance is not None:
        return
    raw = retry_call(
        lambda: client.get(keys.claim)[0], what="reading the checkpoint claim", timeout=timeout
    )
    if raw is not None:
        checkpoints.attach_claim(raw.decode())


def init(config: RuntimeConfig | None = None, **options: Any) -> Job:
    """Join the elastic job this process was started for (``elastic run``), or,
    started alone, a one-worker job on an embedded etcd."""
    return Job(config, **options)


def _resharded(out: dict[str, Any] | None) -> str:
    if not out:
        return ""
    text = f", shards {'moved ' + _size(out['moved']) if out['moved'] else 'in place'}"
    if out.get("rolled"):
        text += f", step rolled forward on {out['rolled']} rank(s)"
    if out.get("lost"):
        text += f", shards {out['lost']} lost every copy: restored step {out['restored']}"
    return text


def _synced(src: int, sync: tuple[int, float] | None) -> str:
    """', state from rank 1 (309.0 MB in 0.21 s, 1.47 GB/s)'."""
    if not sync:
        return f", state from rank {src}"
    moved, took = sync
    rate = moved / took if took > 0 else 0.0
    return f", state from rank {src} ({_size(moved)} in {took:.2f} s, {_size(rate)}/s)"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
