"""Named, seeded fault schedules.

A scenario is a recipe: ``schedule(seed)`` draws every free choice (which
rank, at which step, how long an outage lasts, which checkpoint a storage
fault hits) from ``random.Random(f"{name}:{seed}")``, so the same name and
seed always give the same schedule (``elastic chaos list --seed N`` prints
it).  Timing of the processes themselves is not reproducible; the schedule
says at which *step* or *event* a fault fires, not at which second.

The training run every scenario shares (unless it says otherwise): the chaos
workload, 760 samples, global batch 32, 2 epochs = 48 steps, a checkpoint
every 10 steps, 3 workers, lease TTL 2 s, collective timeout 4 s.  (The
interval does not divide the step count on purpose: ``checkpoint-on-last-step``
covers the case where it does.)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.expectations import (
    EXPECT_ALL_COMMITTED,
    EXPECT_CHECKPOINT_FAILED,
    EXPECT_DAMAGE_DETECTED,
    EXPECT_FAULTS_FIRED,
    EXPECT_JOINED,
    EXPECT_NO_EVICTION,
    EXPECT_STALE_REFUSED,
    EXPECTATIONS,
)
from chaos.faults import StorageFault, manifest_glob, part_glob, shard_glob
from chaos.spec import JOINER, SERVER, FaultSpec


@dataclass(frozen=True)
class TrainConfig:
    """The maths of a run: what the reference is computed for (not timing, not W)."""

    dataset_size: int = 760
    batch_size: int = 32
    epochs: int = 2
    lr: float = 0.05
    seed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.dataset_size // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def args(self) -> list[str]:
        return [
            "--dataset-size",
            str(self.dataset_size),
            "--batch-size",
            str(self.batch_size),
            "--epochs",
            str(self.epochs),
            "--lr",
            str(self.lr),
            "--seed",
            str(self.seed),
        ]

    @property
    def key(self) -> str:
        return f"n{self.dataset_size}-b{self.batch_size}-e{self.epochs}-lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class Schedule:
    """What one (scenario, seed) does: faults in firing order, plus worker-side faults."""

    faults: tuple[FaultSpec, ...] = ()
    storage: tuple[StorageFault, ...] = ()
    slow_step_s: float = 0.0
    slow_steps: int = 0

    @property
    def corrupted_on_purpose(self) -> set[int]:
        return {f.step for f in self.storage if f.corrupts and f.step is not None}

    def describe(self) -> list[str]:
        slow = (
            [f"slow rank: {self.slow_steps} step(s) {self.slow_step_s:g}s slower"]
            if self.slow_steps
            else []
        )
        return [f.describe() for f in self.faults] + [f.describe() for f in self.storage] + slow

    def to_json(self) -> dict[str, Any]:
        return {
            "faults": [f.to_json() for f in self.faults],
            "storage": [f.to_json() for f in self.storage],
            "slow_step_s": self.slow_step_s,
            "slow_steps": self.slow_steps,
        }


@dataclass(frozen=True)
class Shape:
    """The run a schedule is drawn for."""

    workers: int
    total_steps: int
    checkpoint_every: int

    @property
    def checkpoints(self) -> list[int]:
        """Periodic checkpoint steps (the final one excluded)."""
        return list(range(self.checkpoint_every, self.total_steps, self.checkpoint_every))


__all__ = [
    "EXPECT_ALL_COMMITTED",
    "EXPECT_CHECKPOINT_FAILED",
    "EXPECT_DAMAGE_DETECTED",
    "EXPECT_FAULTS_FIRED",
    "EXPECT_JOINED",
    "EXPECT_NO_EVICTION",
    "EXPECT_STALE_REFUSED",
    "SCENARIOS",
    "Scenario",
    "Schedule",
    "Shape",
    "TrainConfig",
    "get",
    "smoke",
]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    draw: Callable[[random.Random, Shape], Schedule]
    workers: int = 3
    step_time: float = 0.1
    checkpoint_every: int = 10
    train: TrainConfig = field(default_factory=TrainConfig)
    bound_s: float = 120.0
    settle_s: float = 0.5
    min_workers: int = 1
    expect: tuple[str, ...] = ()
    smoke: bool = False
    launchers: int = 1  # `elastic run` processes sharing the workers (hosts)
    collective_timeout: float | None = None  # None: the suite's setting
    etcd_members: int = 1  # > 1: an etcd cluster (chaos.etcdcluster) instead of one member
    needs_hosts: bool = False  # only under `elastic chaos run --hosts N` (a link to cut)
    launcher_args: tuple[str, ...] = ()  # more `elastic run` flags (--shard-state ...)

    def __post_init__(self) -> None:
        for name in self.expect:
            EXPECTATIONS[name]  # raises on an unknown name
        if not 1 <= self.launchers <= self.workers:
            raise ValueError(
                f"scenario {self.name}: launchers must be in 1..workers "
                f"({self.workers}), got {self.launchers}"
            )

    @property
    def shape(self) -> Shape:
        return Shape(self.workers, self.train.total_steps, self.checkpoint_every)

    def schedule(self, seed: int) -> Schedule:
        return self.draw(random.Random(f"{self.name}:{seed}"), self.shape)


# -- the recipes -----------------------------------------------------------------------


def _mid(rng: random.Random, s: Shape, lo: float = 0.2, hi: float = 0.45) -> int:
    """A step in the first half, late enough that training is under way."""
    return rng.randint(max(2, int(s.total_steps * lo)), int(s.total_steps * hi))


def _after_checkpoint(rng: random.Random, s: Shape, first: int = 0) -> tuple[int, int]:
    """A checkpoint step (from the ``first``-th on) and a step a few steps after it."""
    ckpt = rng.choice(s.checkpoints[first:-1])
    return ckpt, ckpt + rng.randint(2, s.checkpoint_every - 3)


def kill_worker(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("kill-worker", _mid(rng, s), rank=rng.randrange(s.workers)),))


def kill_server(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("kill-worker", _mid(rng, s), rank=SERVER),))


def kill_rank0(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("kill-worker", _mid(rng, s), rank=0),))


def kill_two(rng: random.Random, s: Shape) -> Schedule:
    step = _mid(rng, s)
    a, b = rng.sample(range(s.workers), 2)
    # Both ranks refer to the same World: the second kill follows within milliseconds.
    return Schedule(
        (FaultSpec("kill-worker", step, rank=a), FaultSpec("kill-worker", step, rank=b))
    )


def kill_same_rank(rng: random.Random, s: Shape) -> Schedule:
    rank = rng.randrange(1, s.workers)
    first = rng.randint(3, 6)
    again = FaultSpec("kill-worker", 0, on="full-world", rank=rank)
    return Schedule((FaultSpec("kill-worker", first, rank=rank), again, again))


def zombie(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (
            FaultSpec(
                "pause-worker", _mid(rng, s), rank=rng.randrange(1, s.workers), duration_s=30.0
            ),
        )
    )


def zombie_rank0(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("pause-worker", _mid(rng, s), rank=0, duration_s=30.0),))


def zombie_rank0_saving(rng: random.Random, s: Shape) -> Schedule:
    ckpt = rng.choice(s.checkpoints[:-1])
    # Hold rank 0's commit (reading the other ranks' part records) long enough
    # for it to be frozen mid-save; it resumes after a newer World formed.
    hold = StorageFault(
        "delay", path=part_glob(ckpt), ops=("cat",), times=None, delay_s=1.5, step=ckpt
    )
    return Schedule(
        (FaultSpec("pause-worker", ckpt, on="checkpoint", rank=0, delay_s=0.3, duration_s=30.0),),
        storage=(hold,),
    )


def step_exception(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("step-exception", _mid(rng, s), rank=rng.randrange(s.workers)),))


def step_exception_twice(rng: random.Random, s: Shape) -> Schedule:
    first = _mid(rng, s, 0.15, 0.3)
    return Schedule(
        (
            FaultSpec("step-exception", first, rank=rng.randrange(s.workers)),
            FaultSpec(
                "step-exception", first + rng.randint(4, 10), rank=rng.randrange(s.workers - 1)
            ),
        )
    )


def slow_rank(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (FaultSpec("slow-rank", _mid(rng, s), rank=rng.randrange(s.workers)),),
        slow_step_s=round(rng.uniform(1.5, 2.5), 2),
        slow_steps=rng.randint(3, 5),
    )


def etcd_kill(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (FaultSpec("kill-etcd", _mid(rng, s), duration_s=round(rng.uniform(0.5, 3.0), 2)),)
    )


def etcd_pause(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (FaultSpec("pause-etcd", _mid(rng, s), duration_s=round(rng.uniform(1.0, 4.0), 2)),)
    )


def etcd_kill_during_save(rng: random.Random, s: Shape) -> Schedule:
    ckpt = rng.choice(s.checkpoints[:-1])
    # Slow the shard writes so the commit (and its fenced etcd transaction)
    # comes while etcd is down.
    slow = StorageFault(
        "delay", path=shard_glob(ckpt), ops=("write",), times=None, delay_s=0.5, step=ckpt
    )
    return Schedule(
        (
            FaultSpec(
                "kill-etcd", ckpt, on="checkpoint", duration_s=round(rng.uniform(1.5, 3.0), 2)
            ),
        ),
        storage=(slow,),
    )


def etcd_outage_with_crash(rng: random.Random, s: Shape) -> Schedule:
    step = _mid(rng, s)
    return Schedule(
        (
            FaultSpec("kill-etcd", step),
            FaultSpec(
                "kill-worker",
                step,
                rank=rng.randrange(s.workers),
                delay_s=round(rng.uniform(0.2, 1.0), 2),
            ),
            FaultSpec("restart-etcd", step, delay_s=round(rng.uniform(1.0, 3.0), 2)),
        )
    )


def storage_transient(rng: random.Random, s: Shape) -> Schedule:
    ckpt = rng.choice(s.checkpoints)
    rank = rng.randrange(s.workers)
    return Schedule(
        storage=(
            StorageFault(
                "fail",
                path=shard_glob(ckpt, rank),
                ops=("write",),
                times=rng.randint(1, 3),
                step=ckpt,
            ),
            StorageFault("fail", path=manifest_glob(ckpt), ops=("write",), times=1, step=ckpt),
            StorageFault(
                "fail", path=part_glob(ckpt), ops=("cat",), times=rng.randint(1, 2), step=ckpt
            ),
        )
    )


def storage_permanent(rng: random.Random, s: Shape) -> Schedule:
    ckpt = rng.choice(s.checkpoints)
    return Schedule(
        storage=(
            StorageFault(
                "fail",
                path=shard_glob(ckpt, 0),
                ops=("write",),
                times=None,
                step=ckpt,
                permanent=True,
            ),
        )
    )


def storage_latency(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        storage=(
            StorageFault(
                "delay",
                path="step-*/g*/r*/data-*",
                ops=("write",),
                times=None,
                delay_s=round(rng.uniform(0.3, 1.0), 2),
            ),
            StorageFault(
                "delay",
                path="step-*/*manifest.json",
                ops=("write",),
                times=None,
                delay_s=round(rng.uniform(0.1, 0.5), 2),
            ),
        )
    )


def _damaged_then_resumed(action: str) -> Callable[[random.Random, Shape], Schedule]:
    def draw(rng: random.Random, s: Shape) -> Schedule:
        ckpt, kill_at = _after_checkpoint(rng, s, first=1)
        damage = StorageFault(
            action,
            path=shard_glob(ckpt, rng.randrange(s.workers)),
            ops=("write",),
            times=1,
            keep=0.5,
            step=ckpt,
        )
        return Schedule((FaultSpec("kill-all-resume", kill_at),), storage=(damage,))

    return draw


def join_burst(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("join", rng.randint(2, 6), count=2),))


def kill_during_save(rng: random.Random, s: Shape) -> Schedule:
    ckpt = rng.choice(s.checkpoints[:-1])
    rank = rng.randrange(s.workers)
    # A slow shard write keeps the victim inside its save when the kill lands.
    slow = StorageFault(
        "delay", path=shard_glob(ckpt, rank), ops=("write",), times=None, delay_s=1.5, step=ckpt
    )
    return Schedule(
        (FaultSpec("kill-worker", ckpt, on="checkpoint", rank=rank, delay_s=0.4),), storage=(slow,)
    )


def kill_during_rendezvous(rng: random.Random, s: Shape) -> Schedule:
    a, b = rng.sample(range(s.workers), 2)
    # The first kill brings a replacement; the second lands while it waits in
    # the settle window (or while a World is being gathered).
    return Schedule(
        (
            FaultSpec("kill-worker", _mid(rng, s, 0.1, 0.2), rank=a),
            FaultSpec("kill-worker", 0, on="rendezvous", rank=b),
        )
    )


def freeze_joiner(rng: random.Random, s: Shape) -> Schedule:
    # The replacement of a killed worker is frozen right after it asked to join.
    # With --min-workers 2 the survivor cannot carry on alone: the job waits
    # (forming a World with the frozen member fails) until the joiner thaws,
    # notices its lease is gone, and joins again.
    step = _mid(rng, s, 0.1, 0.2)
    return Schedule(
        (
            FaultSpec("kill-worker", step, rank=rng.randrange(s.workers)),
            FaultSpec(
                "pause-worker",
                0,
                on="joiner-ready",
                rank=JOINER,
                duration_s=round(rng.uniform(4.0, 8.0), 1),
            ),
        )
    )


def kill_on_failure(rng: random.Random, s: Shape) -> Schedule:
    a, b = rng.sample(range(s.workers), 2)
    return Schedule(
        (
            FaultSpec("step-exception", _mid(rng, s), rank=a),
            FaultSpec("kill-worker", 0, on="failure", rank=b),
        )
    )


def hang_worker(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("hang-worker", _mid(rng, s), rank=rng.randrange(s.workers)),))


def freeze_worker(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (FaultSpec("freeze-worker", _mid(rng, s), rank=rng.randrange(s.workers), duration_s=30.0),)
    )


def kill_host(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("kill-host", _mid(rng, s), rank=rng.randrange(s.workers)),))


def leave(rng: random.Random, s: Shape) -> Schedule:
    return Schedule((FaultSpec("leave", _mid(rng, s), rank=rng.randrange(s.workers)),))


def link_down(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (
            FaultSpec(
                "link-down",
                _mid(rng, s),
                rank=rng.randrange(s.workers),
                duration_s=round(rng.uniform(4.0, 8.0), 1),
            ),
        )
    )


def etcd_leader_kill(rng: random.Random, s: Shape) -> Schedule:
    return Schedule(
        (FaultSpec("kill-etcd-leader", _mid(rng, s), duration_s=round(rng.uniform(2.0, 5.0), 1)),)
    )


def no_faults(rng: random.Random, s: Shape) -> Schedule:
    return Schedule()


def kill_all_resume(rng: random.Random, s: Shape) -> Schedule:
    _, kill_at = _after_checkpoint(rng, s)
    return Schedule((FaultSpec("kill-all-resume", kill_at),))


def kill_all_resume_twice(rng: random.Random, s: Shape) -> Schedule:
    first = rng.choice(s.checkpoints[:2]) + rng.randint(2, s.checkpoint_every - 3)
    second = s.checkpoints[-2] + rng.randint(2, s.checkpoint_every - 3)
    return Schedule((FaultSpec("kill-all-resume", first), FaultSpec("kill-all-resume", second)))


SHARDED = ("--shard-state", "--replicas", "2")
# Two server processes own every shard (a copy each); the workers compute.
SERVERS = ("--servers", "2", "--replicas", "2")


def _scenarios() -> dict[str, Scenario]:
    all_ = [
        Scenario("kill-worker", "SIGKILL one worker (any rank) mid-run", kill_worker, smoke=True),
        Scenario("kill-rank0", "SIGKILL rank 0 (leader, store host) mid-run", kill_rank0),
        Scenario("kill-two-workers", "SIGKILL two of three workers at the same step", kill_two),
        Scenario(
            "kill-same-rank-repeatedly",
            "SIGKILL the same rank three times, each once the World is full again",
            kill_same_rank,
            step_time=0.45,
            bound_s=180.0,
        ),
        Scenario(
            "zombie-worker", "SIGSTOP a worker past its lease TTL, SIGCONT once evicted", zombie
        ),
        Scenario(
            "zombie-rank0", "SIGSTOP rank 0 past its lease TTL, SIGCONT once evicted", zombie_rank0
        ),
        Scenario(
            "zombie-rank0-during-save",
            "freeze rank 0 inside a checkpoint commit; it wakes up in a newer generation",
            zombie_rank0_saving,
            expect=(EXPECT_STALE_REFUSED,),
        ),
        Scenario(
            "step-exception",
            "an exception raised inside one rank's training step",
            step_exception,
            smoke=True,
        ),
        Scenario(
            "step-exception-twice",
            "exceptions inside the step on two occasions",
            step_exception_twice,
        ),
        Scenario(
            "slow-rank",
            "one rank runs slower than its peers (below the collective "
            "timeout) for a few steps: it must not be evicted",
            slow_rank,
            expect=(EXPECT_NO_EVICTION,),
        ),
        Scenario(
            "etcd-kill-restart",
            "SIGKILL etcd, restart it on its data dir after an outage",
            etcd_kill,
            smoke=True,
        ),
        Scenario("etcd-pause", "SIGSTOP etcd for up to 4 s, then SIGCONT", etcd_pause),
        Scenario(
            "etcd-kill-during-save",
            "SIGKILL etcd while a checkpoint commits",
            etcd_kill_during_save,
        ),
        Scenario(
            "etcd-outage-with-crash",
            "a worker dies while etcd is down; etcd comes back, the job re-forms",
            etcd_outage_with_crash,
        ),
        Scenario(
            "storage-transient",
            "transient storage errors on shard, part-record and "
            "manifest I/O of one checkpoint: retried",
            storage_transient,
            smoke=True,
            expect=(EXPECT_ALL_COMMITTED,),
        ),
        Scenario(
            "storage-permanent",
            "a permanent storage error on one checkpoint: reported, "
            "nothing torn, later checkpoints commit",
            storage_permanent,
            expect=(EXPECT_CHECKPOINT_FAILED,),
        ),
        Scenario(
            "storage-latency",
            "slow shard writes and manifest commits on every checkpoint",
            storage_latency,
            expect=(EXPECT_ALL_COMMITTED,),
        ),
        Scenario(
            "storage-torn-write",
            "a shard file is torn on write; every worker is then "
            "killed and the job resumed: the torn step must be skipped",
            _damaged_then_resumed("truncate"),
            expect=(EXPECT_DAMAGE_DETECTED,),
        ),
        Scenario(
            "storage-bitflip",
            "one bit of a shard file flips on write; every worker is "
            "then killed and the job resumed: the bad step must be skipped",
            _damaged_then_resumed("bitflip"),
            expect=(EXPECT_DAMAGE_DETECTED,),
        ),
        Scenario(
            "join-burst",
            "two workers join a running job at once",
            join_burst,
            workers=2,
            step_time=0.3,
            expect=(EXPECT_JOINED,),
            settle_s=1.0,
        ),
        Scenario(
            "kill-during-save", "SIGKILL a worker while it writes a checkpoint", kill_during_save
        ),
        Scenario(
            "kill-during-rendezvous",
            "SIGKILL a worker while a World is being formed",
            kill_during_rendezvous,
            step_time=0.3,
            settle_s=1.5,
        ),
        Scenario(
            "zombie-joiner",
            "a replacement worker freezes right after asking to join "
            "while the job may not run below 2 workers; it thaws and joins again",
            freeze_joiner,
            workers=2,
            min_workers=2,
            step_time=0.3,
        ),
        Scenario(
            "kill-on-failure", "SIGKILL a survivor right after a peer failed", kill_on_failure
        ),
        Scenario(
            "kill-all-resume",
            "SIGKILL the launcher and every worker, then --resume",
            kill_all_resume,
            smoke=True,
        ),
        Scenario(
            "checkpoint-on-last-step",
            "no fault: the periodic checkpoint falls on the "
            "last step, where the final checkpoint is taken too",
            no_faults,
            checkpoint_every=8,
            bound_s=90.0,
        ),
        Scenario(
            "kill-all-resume-twice",
            "kill everything and resume, two times",
            kill_all_resume_twice,
            bound_s=180.0,
        ),
        Scenario(
            "hang-worker",
            "one rank's training thread hangs while its lease lives: it "
            "is evicted by progress detection and replaced",
            hang_worker,
            smoke=True,
            collective_timeout=60.0,
        ),
        Scenario(
            "freeze-worker",
            "SIGSTOP a worker under a 120 s collective timeout: the "
            "survivors abandon the collective when its lease expires",
            freeze_worker,
            collective_timeout=120.0,
        ),
        Scenario(
            "kill-host",
            "SIGKILL one of two launchers and every worker it started",
            kill_host,
            workers=4,
            launchers=2,
        ),
        Scenario(
            "leave",
            "SIGTERM one worker: it leaves at the next step boundary, the others "
            "carry on without a replacement",
            leave,
        ),
        # The cut-off host must rejoin before the end: a longer run (96 steps) at
        # a slower pace than the others.
        Scenario(
            "link-down",
            "cut one host's link for 4-8 s (3 hosts, a worker each): the "
            "others re-form without it, it trains nothing meanwhile and rejoins",
            link_down,
            launchers=3,
            needs_hosts=True,
            step_time=0.25,
            train=TrainConfig(epochs=4),
            bound_s=240.0,
        ),
        Scenario(
            "kill-owner",
            "sharded optimizer state, 2 copies of each shard: SIGKILL one owner "
            "mid-run; its shards are copied from the other copies, no storage read",
            kill_worker,
            # Not in smoke (CI time): tests/loop/test_sharded.py kills an owner.
            launcher_args=SHARDED,
        ),
        Scenario(
            "kill-both-owners",
            "sharded state, 2 copies: SIGKILL two of three owners at the same step "
            "(some shard loses both copies): the newest checkpoint is restored",
            kill_two,
            launcher_args=SHARDED,
        ),
        Scenario(
            "kill-server",
            "parameter servers (--servers 2, 2 copies): SIGKILL a server mid-run; "
            "the other holds every shard, the job goes on with no storage read",
            kill_server,
            launcher_args=SERVERS,
        ),
        Scenario(
            "join-owner",
            "sharded state, 2 copies: two workers join; shards are re-placed onto them",
            join_burst,
            workers=2,
            step_time=0.3,
            expect=(EXPECT_JOINED,),
            settle_s=1.0,
            launcher_args=SHARDED,
        ),
        Scenario(
            "etcd-leader-loss",
            "SIGKILL the leader of a 3-member etcd cluster, restart "
            "it after 2-5 s: training goes on through the other two, no step redone",
            etcd_leader_kill,
            launchers=3,
            etcd_members=3,
        ),
    ]
    return {s.name: s for s in all_}


SCENARIOS: dict[str, Scenario] = _scenarios()


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


def smoke() -> list[Scenario]:
    return [s for s in SCENARIOS.values() if s.smoke]
