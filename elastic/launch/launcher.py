"""`elastic run`: spawns and supervises local workers.

Elastic mode (default): each worker is a member of the job; a worker that
crashes has its lease revoked at once (so survivors re-form without waiting
for the TTL) and is replaced by a new member, up to ``--max-restarts``. A
second ``elastic run --job J --etcd URL`` adds workers to a running job.
SIGINT/SIGTERM to the launcher stop the whole job after a final checkpoint.

``--torchrun-compat``: for unmodified torchrun scripts (RANK, WORLD_SIZE,
MASTER_ADDR, ... and ``init_process_group()``): on any failure all local
workers are restarted, as torchrun does, each time on a fresh master port.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..base.addr import local_address, mixed_hosts, this_host
from ..base.errors import ConfigError, ElasticError
from ..base.events import Event, EventLog, error_fields
from ..base.exitcodes import EXIT_FAILED, EXIT_FATAL, EXIT_INTERRUPTED, EXIT_STOPPED
from ..base.procutil import dying_with_parent
from ..coord.etcd import EmbeddedEtcd, EtcdConfig, connect, free_port, retry_call
from ..coord.hangs import HangConfig
from ..coord.keys import Keyspace
from ..coord.rendezvous import MAX_WORKERS, RendezvousConfig
from ..train.config import RuntimeConfig, default_of
from . import argtypes
from .etcdopts import check_credentials, etcd_config
from .preflight import check_script, torchrun_advice, torchrun_failure
from .progress import ProgressConfig, ProgressView


@dataclass
class _Worker:
    member_id: str
    local_rank: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    reported: bool = False  # its exit was taken from the queue and handled


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    from .etcdopts import add_etcd_options

    p = sub.add_parser(
        "run",
        help="run a training script on elastic workers",
        description="Run SCRIPT on N local workers that survive failures and joins.",
    )
    p.add_argument(
        "-n", "--nproc", type=int, default=1, metavar="N", help="local workers to start (default 1)"
    )
    p.add_argument("--job", default=None, help="job id (default: a new random one)")
    p.add_argument(
        "--min-workers",
        type=int,
        default=default_of(RendezvousConfig, "min_workers"),
        help="keep training while at least this many workers live (default %(default)s)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="at most this many train; extras wait as standbys (default: no cap)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="URL",
        help="checkpoint location (any fsspec URL; default with the embedded "
        "etcd: ./elastic-checkpoints/JOB, with --etcd: none)",
    )
    p.add_argument(
        "--no-checkpoint", action="store_true", help="write no checkpoint, not even the final one"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=default_of(RuntimeConfig, "checkpoint_every"),
        metavar="STEPS",
        help="checkpoint every STEPS steps (default: only at the end)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint"
    )
    p.add_argument(
        "--pause-joins",
        action="store_true",
        help="the World waits while a joiner receives the state (default: it trains on)",
    )
    p.add_argument(
        "--shard-state",
        action="store_true",
        help="shard the optimizer state over the workers, each shard on --replicas of them",
    )
    p.add_argument(
        "--servers",
        type=int,
        default=0,
        metavar="S",
        help="also start S server processes that hold the sharded optimizer state and "
        "compute nothing (the parameter-server model; implies --shard-state)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="K",
        help="copies of each shard with --shard-state; any K-1 lost owners lose "
        f"nothing (default {default_of(RuntimeConfig, 'replicas')})",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=default_of(RuntimeConfig, "shards"),
        metavar="S",
        help="shards the optimizer state is cut into with --shard-state (default %(default)s)",
    )
    p.add_argument(
        "--checkpoint-key-file",
        default=None,
        metavar="PATH",
        help="sign checkpoints with the key in PATH; refuse unsigned ones",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="replace crashed local workers this many times in all (default 3)",
    )
    p.add_argument(
        "--lease-ttl",
        type=argtypes.seconds,
        default=default_of(RendezvousConfig, "lease_ttl"),
        metavar="S",
        help="a frozen worker is evicted after S seconds (default %(default)g)",
    )
    p.add_argument(
        "--collective-timeout",
        type=argtypes.seconds,
        default=default_of(RuntimeConfig, "collective_timeout"),
        metavar="S",
        help="a collective hung for S seconds counts as failed (default %(default)g)",
    )
    p.add_argument(
        "--hang-floor",
        type=argtypes.seconds,
        default=default_of(HangConfig, "floor_s"),
        metavar="S",
        help="a rank that reaches a step's all-reduce later than max(S, "
        "FACTOR x median step time) after its peers is evicted as hung "
        "(default %(default)g; never later than 0.9 x --collective-timeout)",
    )
    p.add_argument(
        "--hang-factor",
        type=argtypes.factor,
        default=default_of(HangConfig, "factor"),
        metavar="FACTOR",
        help="see --hang-floor (default %(default)g)",
    )
    p.add_argument(
        "--settle",
        type=argtypes.seconds_or_zero,
        default=default_of(RendezvousConfig, "settle_s"),
        metavar="S",
        help="wait S quiet seconds after a join before re-forming (default %(default)g)",
    )
    p.add_argument(
        "--join-timeout",
        type=argtypes.seconds,
        default=default_of(RuntimeConfig, "join_timeout"),
        metavar="S",
        help="give up when no World forms within S seconds (default %(default)g)",
    )
    p.add_argument(
        "--etcd-outage",
        type=argtypes.seconds,
        default=default_of(RuntimeConfig, "etcd_outage"),
        metavar="S",
        help="a worker cut off from etcd keeps trying to rejoin for S seconds "
        "(a partition may heal), then stops (default %(default)g)",
    )
    p.add_argument(
        "--event-log",
        default=None,
        metavar="PATH",
        help="JSONL event log (default ./elastic-JOB.events.jsonl)",
    )
    p.add_argument(
        "--ledger-dir",
        default=None,
        metavar="DIR",
        help="write a per-worker sample ledger here (for exactly-once checks)",
    )
    p.add_argument(
        "--host",
        default=None,
        metavar="ADDR",
        help="address of this machine that the others reach it at; workers "
        "listen on it alone (default: the local address of the route to "
        "etcd, so 127.0.0.1 with the embedded etcd)",
    )
    p.add_argument(
        "--torchrun-compat",
        action="store_true",
        help="run an unmodified torchrun script; restart all workers on failure",
    )
    p.add_argument(
        "--stop-grace",
        type=argtypes.seconds,
        default=120.0,
        metavar="S",
        help="after SIGINT/SIGTERM wait S seconds for the final checkpoint (default 120)",
    )
    p.add_argument(
        "--progress-every",
        type=argtypes.seconds,
        default=10.0,
        metavar="S",
        help="progress line every S seconds when stderr is not a terminal "
        "(default 10; redrawn in place on a terminal)",
    )
    add_etcd_options(p, required=False)
    p.add_argument("script", help="training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments of the script")
    p.set_defaults(func=run_command)


def _validate(args: argparse.Namespace) -> None:
    """Refuse bad input before anything starts.  Only what no config value holds is
    checked here (the script, -n, restarts, paths, flags that contradict each other);
    every setting a config dataclass owns is checked by building that config."""
    if not os.path.isfile(args.script):
        raise ConfigError(f"training script {args.script!r} does not exist")
    if args.nproc < 1:
        raise ConfigError(f"-n/--nproc must be >= 1, got {args.nproc}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.no_checkpoint and (args.checkpoint or args.checkpoint_every):
        raise ConfigError("--no-checkpoint contradicts --checkpoint/--checkpoint-every")
    if args.stop_grace <= 0:
        raise ConfigError("--stop-grace must be > 0")
    _check_sharding(args)
    check_credentials(args)
    _check_configs(args)
    if args.event_log is not None:
        _check_writable_file("--event-log", args.event_log)
    if args.ledger_dir is not None:
        _check_directory("--ledger-dir", args.ledger_dir)
    if args.host is not None:
        local_address(args.host)  # before anything starts; the route needs etcd's URL


def _check_sharding(args: argparse.Namespace) -> None:
    if args.servers < 0:
        raise ConfigError(f"--servers must be >= 0, got {args.servers}")
    if args.servers:
        args.shard_state = True  # servers hold shards: --servers implies --shard-state
    if args.replicas is not None and not args.shard_state:
        raise ConfigError("--replicas needs --shard-state (it counts the copies of each shard)")
    if args.shards != default_of(RuntimeConfig, "shards") and not args.shard_state:
        raise ConfigError("--shards needs --shard-state")
    k = args.replicas if args.replicas is not None else default_of(RuntimeConfig, "replicas")
    if not args.shard_state or k < 1:
        return  # k < 1: refused by the config, naming the flag
    if args.max_workers is not None and k > args.max_workers:
        raise ConfigError(
            f"--replicas {k} is more than --max-workers {args.max_workers}: each copy of a "
            "shard needs its own owner"
        )


def _check_owners(args: argparse.Namespace) -> None:
    """A new job must start with enough owners for every copy (a launcher
    joining a running job adds owners: it may start fewer)."""
    k = _replicas(args)
    if args.servers and k > args.servers:
        raise ConfigError(
            f"--replicas {k} is more than the {args.servers} server(s) of --servers: only "
            "servers own shards when there are servers, each copy on its own"
        )
    if args.shard_state and not args.servers and k > max(args.nproc, args.min_workers):
        raise ConfigError(
            f"--replicas {k} is more than the {args.nproc} worker(s) this launch starts "
            f"(--min-workers {args.min_workers}): each copy of a shard needs its own owner; "
            "start more, or raise --min-workers when other hosts add the rest"
        )


def _check_configs(args: argparse.Namespace) -> None:
    """Build the config values the flags set, as the launch will, and turn a refusal
    into one naming the flag.  Each config grows one flag at a time, so the flag
    named is the one whose value the config refused (or the pair that disagrees)."""
    workers = [("--min-workers", "min_workers", args.min_workers)]
    if args.max_workers is not None:
        workers.append(("--min-workers/--max-workers", "max_workers", args.max_workers))
    _grow(
        RendezvousConfig,
        {},
        *workers,
        ("--settle", "settle_s", args.settle),
        ("--lease-ttl", "lease_ttl", args.lease_ttl),
    )
    _grow(
        HangConfig,
        {},
        ("--hang-floor", "floor_s", args.hang_floor),
        ("--hang-factor", "factor", args.hang_factor),
    )
    _grow(
        RuntimeConfig,
        {"member_id": "launcher", "etcd": etcd_config(args) if args.etcd else _EMBEDDED},
        ("--job", "job", "job" if args.job is None else args.job),
        ("--collective-timeout", "collective_timeout", args.collective_timeout),
        ("--join-timeout", "join_timeout", args.join_timeout),
        ("--etcd-outage", "etcd_outage", args.etcd_outage),
        ("--checkpoint", "checkpoint", args.checkpoint),
        ("--checkpoint-every", "checkpoint_every", args.checkpoint_every),
        ("--resume", "resume", args.resume),
        ("--replicas", "replicas", _replicas(args)),
        ("--shards", "shards", args.shards),
    )
    _grow(ProgressConfig, {}, ("--progress-every", "interval_s", args.progress_every))


def _replicas(args: argparse.Namespace) -> int:
    return args.replicas if args.replicas is not None else default_of(RuntimeConfig, "replicas")


# Stands in for the embedded etcd a launch without --etcd starts (its port is not known yet).
_EMBEDDED = EtcdConfig(endpoints=(("127.0.0.1", 2379),))


def _grow(config: type, fixed: dict[str, Any], *flags: tuple[str, str, Any]) -> None:
    values = dict(fixed)
    for flag, name, value in flags:
        values[name] = value
        try:
            config(**values)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from exc


def _check_writable_file(flag: str, path: str) -> None:
    """A file the launcher or its workers will append to, checked before any start
    (an uncreatable one otherwise fails every worker, restart after restart)."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: cannot create files under {probe!r}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path!r} is not writable")


def _check_directory(flag: str, path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} exists and is not a directory")
    _check_writable_file(flag, os.path.join(path, "probe"))


def _check_checkpoint(
    args: argparse.Namespace, joining: bool, job: str, client: Any, keys: Keyspace
) -> None:
    """Before any worker starts: refuse a location workers cannot share or write,
    refuse to silently start over on (or resume from nothing in) one, and claim it
    for this launch, telling the job's workers which launch that is through etcd.
    A launcher joining a running job checks only what its own workers need."""
    if args.checkpoint_key_file:  # workers may run elsewhere in the tree
        args.checkpoint_key_file = os.path.abspath(args.checkpoint_key_file)
    if not args.checkpoint:
        return
    from storage import CheckpointStore, StorageError, load_key_file

    where = f"checkpoint location {args.checkpoint!r}"
    try:
        key = load_key_file(args.checkpoint_key_file) if args.checkpoint_key_file else None
        store = CheckpointStore(args.checkpoint, key=key)
    except StorageError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if store.process_local:
        raise ConfigError(
            f"{where} lives in one process's memory, and the workers of a job are separate "
            "processes: they cannot share it (use a directory or an object store)"
        )
    if joining:
        return
    try:
        store.probe()
        # Any commit counts, signed or not: a fresh run never starts over on one.
        latest = CheckpointStore(args.checkpoint).latest()
        if args.resume and (latest is None or (key is not None and store.latest() is None)):
            signed = " signed with the key" if latest is not None else ""
            raise ConfigError(
                f"--resume: no committed checkpoint{signed} in "
                f"{args.checkpoint!r}" + ("" if signed else " (empty location)")
            )
        if not args.resume and latest is not None:
            raise ConfigError(
                f"{args.checkpoint!r} already holds checkpoints (newest step {latest.step}); "
                "pass --resume to continue from it, or use an empty location"
            )
    except StorageError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    # One claim per job, not per launcher: the launchers of one job start
    # side by side (one per host) and must all adopt the claim of whichever
    # recorded it in etcd first; only that one writes it into the location.
    claim_key = keys.claim
    instance = f"{job}-{uuid.uuid4().hex[:12]}"
    tx = client.transactions
    created, resp = retry_call(
        lambda: client.transaction(
            compare=[tx.version(claim_key) == 0],
            success=[tx.put(claim_key, instance)],
            failure=[tx.get(claim_key)],
        ),
        what="recording the checkpoint claim",
        timeout=args.etcd_timeout,
    )
    if not created:
        return  # another launcher of this job claimed the location; its workers' claim is ours
    try:
        store.claim(instance, job, takeover=args.resume)
    except StorageError as exc:
        retry_call(
            lambda: client.delete(claim_key),
            what="withdrawing the checkpoint claim",
            timeout=args.etcd_timeout,
        )
        raise ConfigError(f"{where}: {exc}") from exc


def _member_addresses(client: object, keys: Keyspace, timeout: float) -> list[tuple[str, str]]:
    """``(member id, address)`` of the job's current members."""
    from ..coord.membership import Member

    records = retry_call(
        lambda: list(client.get_prefix(keys.members)),  # type: ignore[attr-defined]
        what="listing the job's members",
        timeout=timeout,
    )
    return [(m.id, m.address) for m in (Member.from_json(v) for v, _ in records)]


def _safe_host() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:24].strip("-.")
    return name or "host"


def run_command(args: argparse.Namespace) -> int:
    _validate(args)
    if args.torchrun_compat:
        return _run_torchrun_compat(args)
    check_script(args.script, args.nproc)
    return ElasticLauncher(args).run()


class ElasticLauncher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.job = args.job or f"job-{uuid.uuid4().hex[:8]}"
        self.etcd_server: EmbeddedEtcd | None = None
        self.workers: dict[str, _Worker] = {}
        self.exits: queue.Queue = queue.Queue()
        self.restarts = 0
        self.stop_requested: int | None = None
        self.launch_id = f"{_safe_host()}-{os.getpid()}"
        self._next_evict_check = 0.0
        self._killed: set[str] = set()
        self._respawns: list[tuple[float, int, int]] = []
        self._quick_failures = 0
        self._formed = False
        self._launched = time.monotonic()
        self._next_waiting_report = time.monotonic() + 2.0
        self.etcd_lost = False

    def run(self) -> int:
        args = self.args
        try:
            etcd_url = args.etcd
            if etcd_url is None:
                self.etcd_server = EmbeddedEtcd(die_with_parent=True).start()
                etcd_url = self.etcd_server.url
            args.etcd = etcd_url
            self.client = connect(etcd_config(args))
            self.keys = Keyspace(self.job, args.etcd_prefix)
            joining = self._job_running()
            if (
                args.checkpoint is None
                and not args.no_checkpoint
                and not joining
                and self.etcd_server is not None
            ):
                # One machine (the embedded etcd listens on 127.0.0.1 only), so a
                # local directory is reachable by every worker: checkpoint there by
                # default. With --etcd, workers may sit on other machines, where a
                # local path would split one checkpoint over several disks.
                args.checkpoint = "file://" + os.path.abspath(
                    os.path.join("elastic-checkpoints", self.job)
                )
            if args.checkpoint_every and not args.checkpoint and not joining:
                raise ConfigError(
                    "--checkpoint-every needs a location: pass --checkpoint URL "
                    "(with --etcd there is no default)"
                )
            _check_checkpoint(args, joining, self.job, self.client, self.keys)
            if not joining:
                _check_owners(args)
            self.base_config = self._runtime_config(etcd_url, joining)
            self.progress = ProgressView(
                self.base_config.event_log,
                nproc=args.nproc + args.servers,  # the processes it starts
                config=ProgressConfig(interval_s=args.progress_every),
            )
            self.events = EventLog(
                self.base_config.event_log,
                source=f"launcher-{os.getpid()}",
                console=self.progress.write,
            )
            self.events.emit(
                Event.LAUNCH,
                f"job {self.job} on etcd {etcd_url}: starting {args.nproc} worker(s)"
                + (f" and {args.servers} server(s)" if args.servers else "")
                + (" (joining a running job)" if joining else "")
                + f"; add workers with: elastic run --job {self.job} --etcd {etcd_url} -n 1 "
                + args.script
                + f"; events in {self.base_config.event_log}"
                + (
                    f"; checkpoints in {args.checkpoint}" if args.checkpoint and not joining else ""
                ),
                job=self.job,
                etcd=etcd_url,
                nproc=args.nproc,
                joining=joining,
            )
            least = self.base_config.rendezvous.min_workers
            if not joining and least > args.nproc:
                self.events.emit(
                    Event.NOTE,
                    f"--min-workers {least} is above the "
                    f"{args.nproc} worker(s) this launcher starts: training starts once other "
                    f"launchers add {least - args.nproc} (elastic run "
                    f"--job {self.job} --etcd {etcd_url} -n N {args.script})",
                )
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)
            for i in range(args.nproc):
                self._spawn(i, f"{self.launch_id}-{i}")
            for j in range(args.servers):
                self._spawn(args.nproc + j, f"{self.launch_id}-s{j}")
            rc = self._supervise()
            self.progress.finish(rc)
            return rc
        finally:
            self._shutdown()

    # -- setup -----------------------------------------------------------------

    def _job_running(self) -> bool:
        # Retried: an etcd election ("leader changed") must not fail a start.
        gen, done = retry_call(
            lambda: (self.client.get(self.keys.gen)[0], self.client.get(self.keys.done)[0]),
            what="reading the job's state",
            timeout=self.args.etcd_timeout,
        )
        if done is not None:
            raise ConfigError(
                f"job {self.job} already finished (at step {done.decode()}); use a new --job"
            )
        return gen is not None

    def _runtime_config(self, etcd_url: str, joining: bool) -> RuntimeConfig:
        args = self.args
        host = this_host(args.host, EtcdConfig.from_url(etcd_url).endpoints).ip
        problem = mixed_hosts(host, _member_addresses(self.client, self.keys, args.etcd_timeout))
        if problem is not None:
            raise ConfigError(problem)
        # The first launcher records the job's bounds; joiners adopt them so any
        # member that becomes leader applies the same rules.
        job_conf = {"min_workers": args.min_workers, "max_workers": args.max_workers or MAX_WORKERS}
        tx = self.client.transactions
        key = self.keys.ctl + "config"
        ok, resp = retry_call(
            lambda: self.client.transaction(
                compare=[tx.version(key) == 0],
                success=[tx.put(key, json.dumps(job_conf))],
                failure=[tx.get(key)],
            ),
            what="reading the job's settings",
            timeout=args.etcd_timeout,
        )
        if not ok:
            job_conf = json.loads(resp[0][0][0])
        initial = 0 if joining else min(args.nproc + args.servers, job_conf["max_workers"])
        return RuntimeConfig(
            job=self.job,
            member_id=f"{self.launch_id}-0",
            etcd=etcd_config(args),
            rendezvous=RendezvousConfig(
                min_workers=job_conf["min_workers"],
                max_workers=job_conf["max_workers"],
                initial_workers=initial,
                settle_s=args.settle,
                lease_ttl=args.lease_ttl,
            ),
            hangs=HangConfig(floor_s=args.hang_floor, factor=args.hang_factor),
            collective_timeout=args.collective_timeout,
            join_timeout=args.join_timeout,
            etcd_outage=args.etcd_outage,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            checkpoint_key_file=args.checkpoint_key_file,
            resume=args.resume,
            live_join=not args.pause_joins,
            shard_state=args.shard_state,
            replicas=_replicas(args),
            shards=args.shards,
            event_log=os.path.abspath(args.event_log or f"elastic-{self.job}.events.jsonl"),
            ledger_dir=os.path.abspath(args.ledger_dir) if args.ledger_dir else None,
            advertise_host=host,
            etcd_prefix=args.etcd_prefix,
        )

    # -- workers ---------------------------------------------------------------

    def _spawn(self, local_rank: int, member_id: str) -> None:
        from dataclasses import replace

        # Local ranks past -n are the servers (--servers), restarts included.
        role = "server" if local_rank >= self.args.nproc else "worker"
        cfg = replace(self.base_config, member_id=member_id, role=role)
        env = dict(os.environ)
        env.update(cfg.to_env())
        env["LOCAL_RANK"] = str(local_rank)
        env["PYTHONUNBUFFERED"] = "1"
        _share_cores(env, self.args.nproc)
        # A new session: a terminal Ctrl-C reaches only the launcher, which then
        # stops the job in order (final checkpoint) instead of killing workers.
        proc = subprocess.Popen(
            dying_with_parent([sys.executable, self.args.script, *self.args.script_args]),
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.progress.forward(proc)  # its lines must not land on the progress line
        worker = _Worker(member_id, local_rank, proc)
        self.workers[member_id] = worker
        threading.Thread(target=lambda: self.exits.put((worker, proc.wait())), daemon=True).start()
        self.events.emit(
            Event.SPAWN,
            f"started {role} {member_id} (pid {proc.pid})",
            member=member_id,
            pid=proc.pid,
            role=role,
        )

    def _revoke(self, member_id: str) -> None:
        """Remove a dead worker's keys now instead of after its lease TTL."""
        try:
            raw = self.client.get(self.keys.lease_of(member_id))[0]
            if raw is not None:
                self.client.revoke_lease(int(raw))
        except Exception as exc:  # the TTL still removes it
            self.events.emit(
                Event.REVOKE_FAILED,
                f"could not revoke {member_id}: {exc}",
                member=member_id,
                **error_fields(exc),
            )

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_requested is None:
            self.stop_requested = signum
            threading.Thread(target=self._request_stop, daemon=True).start()

    def _request_stop(self) -> None:
        self.events.emit(
            Event.STOP,
            f"stopping job {self.job} after a final checkpoint",
            signal=self.stop_requested,
        )
        try:
            retry_call(
                lambda: self.client.put(self.keys.stop, "1"),
                what="requesting a stop",
                timeout=self.args.etcd_timeout,
            )
        except ElasticError as exc:
            self.events.emit(
                Event.STOP_FAILED, f"could not request a stop: {exc}", **error_fields(exc)
            )
            for w in self.workers.values():
                _signal(w.proc, signal.SIGTERM)

    def _supervise(self) -> int:
        failed = False
        stop_deadline: float | None = None
        # Until every exit is handled, not until every process is gone: a
        # returncode is set before its waiter thread queues the exit, and an
        # exit left in the queue would go unreported (no exit, no give_up).
        while any(not w.reported for w in self.workers.values()) or self._respawns:
            self._respawn_due()
            if self.stop_requested is not None and stop_deadline is None:
                stop_deadline = time.monotonic() + self.args.stop_grace
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                self.events.emit(Event.STOP_TIMEOUT, "workers did not stop in time: killing them")
                for w in self.workers.values():
                    _signal(w.proc, signal.SIGKILL)
                stop_deadline = float("inf")
            try:
                worker, rc = self.exits.get(timeout=0.5)
            except queue.Empty:
                self._kill_evicted()
                self._report_waiting()
                continue
            worker.reported = True
            self.events.emit(
                Event.EXIT,
                f"worker {worker.member_id} exited with {rc}",
                member=worker.member_id,
                rc=rc,
            )
            if rc in (0, EXIT_STOPPED):
                continue
            self._revoke(worker.member_id)
            if self.stop_requested is not None or self._job_done():
                continue
            why = self._no_restart(worker, rc)
            if why or self.restarts >= self.args.max_restarts:
                self.events.emit(
                    Event.GIVE_UP,
                    why
                    or f"worker {worker.member_id} failed; no "
                    f"restarts left ({self.args.max_restarts} used)",
                    member=worker.member_id,
                )
                failed = True
                continue
            self.restarts += 1
            self._schedule_respawn(worker)
        if self._job_done():
            self.events.emit(Event.DONE, f"job {self.job} finished")
            return 0
        if self.stop_requested is not None:
            return EXIT_INTERRUPTED
        if failed:
            return EXIT_FAILED
        if not self._ever_formed():
            self.events.emit(
                Event.NEVER_JOINED,
                f"every worker exited without joining job {self.job}: does "
                f"{self.args.script} train through elastic (Trainer(...).fit())? A torchrun "
                "script needs --torchrun-compat",
            )
            return EXIT_FAILED
        # Our workers left or were stopped while the job goes on elsewhere.
        return EXIT_STOPPED

    def _ever_formed(self) -> bool:
        try:
            return retry_call(
                lambda: self.client.get(self.keys.gen)[0] is not None,
                what="reading the generation",
                timeout=self.args.etcd_timeout,
            )
        except ElasticError:
            return True  # unknown: say nothing rather than something wrong

    # While no World has formed, say every so often what it waits for (a job
    # with --min-workers above the workers present waits for other launchers).
    WAITING_EVERY_S = 10.0

    def _report_waiting(self) -> None:
        now = time.monotonic()
        if now < self._next_waiting_report or self._formed:
            return
        # Workers need seconds to start (torch's import): say nothing early
        # unless this launcher alone cannot reach the minimum.
        if (
            self.base_config.rendezvous.min_workers <= self.args.nproc
            and now - self._launched < self.WAITING_EVERY_S * 3
        ):
            return
        self._next_waiting_report = now + self.WAITING_EVERY_S
        try:
            if self.client.get(self.keys.gen)[0] is not None:
                self._formed = True
                return
            present = len(list(self.client.get_prefix(self.keys.members, keys_only=True)))
        except Exception:  # a courtesy line; etcd trouble is reported elsewhere
            return
        want = self.base_config.rendezvous.min_workers
        if present < want:
            self.events.emit(
                Event.WAITING,
                f"waiting for {want} workers ({present} present): start "
                f"{want - present} more with: elastic run --job {self.job} --etcd "
                f"{self.args.etcd} -n {want - present} {self.args.script}",
                present=present,
                want=want,
            )

    # Restarts back off: a worker that fails soon after its start again and
    # again (a bug in the script, a machine problem) is restarted after 0.5 s,
    # 1 s, 2 s, ... up to 30 s instead of in a tight loop; a worker that ran
    # for a while before failing is replaced at once.
    BACKOFF_FIRST_S = 0.5
    BACKOFF_MAX_S = 30.0
    QUICK_FAILURE_S = 30.0

    def _schedule_respawn(self, worker: _Worker) -> None:
        lived = time.monotonic() - worker.started
        self._quick_failures = self._quick_failures + 1 if lived < self.QUICK_FAILURE_S else 0
        delay = 0.0
        if self._quick_failures > 1:
            delay = min(self.BACKOFF_FIRST_S * 2 ** (self._quick_failures - 2), self.BACKOFF_MAX_S)
            self.events.emit(
                Event.BACKOFF,
                f"worker {worker.member_id} failed "
                f"{self._quick_failures} times in a row within "
                f"{self.QUICK_FAILURE_S:.0f}s of its start: restarting in "
                f"{delay:.1f}s",
                member=worker.member_id,
                seconds=delay,
            )
        self._respawns.append((time.monotonic() + delay, worker.local_rank, self.restarts))

    def _respawn_due(self) -> None:
        now = time.monotonic()
        due = [r for r in self._respawns if r[0] <= now]
        if self.stop_requested is not None:
            due, self._respawns = [], []  # the job is stopping: replace nobody
        self._respawns = [r for r in self._respawns if r not in due]
        for _, local_rank, n in due:
            self._spawn(local_rank, f"{self.launch_id}-{local_rank}-r{n}")

    def _no_restart(self, worker: _Worker, rc: int) -> str | None:
        """Why a restart cannot help (one line), or None."""
        if rc == EXIT_FATAL:
            return (
                f"worker {worker.member_id} stopped on an error a restart cannot fix "
                "(the line above): not restarting it"
            )
        if torchrun_failure(self.progress.stderr_tail(worker.proc.pid)):
            return (
                f"worker {worker.member_id} ran a torchrun-style init_process_group(): "
                + torchrun_advice(self.args.script, self.args.nproc)
            )
        if not self.etcd_lost:
            try:
                retry_call(
                    lambda: self.client.get(self.keys.gen),
                    what="checking etcd",
                    timeout=self.args.etcd_timeout,
                )
            except ElasticError:
                self.etcd_lost = True
        if self.etcd_lost:
            return (
                f"etcd at {self.args.etcd} does not answer: not restarting worker "
                f"{worker.member_id} (a finished job's first launcher stops its embedded "
                "etcd: start a new job)"
            )
        return None

    def _job_done(self) -> bool:
        # Retried: with an etcd cluster one member may be dead, and one failed
        # read must not turn a finished job into "stopped" (seen: exit 3 after
        # an etcd leader was killed).
        try:
            return retry_call(
                lambda: self.client.get(self.keys.done)[0] is not None,
                what="reading whether the job finished",
                timeout=self.args.etcd_timeout,
            )
        except ElasticError:
            return False

    def _kill_evicted(self) -> None:
        """SIGKILL local workers that peers evicted as hung (rate-limited reads).

        An evicted worker's lease is revoked, so it is fenced already; but its
        training thread is stuck and may never notice: kill it so that it is
        replaced like a crashed worker.
        """
        now = time.monotonic()
        if now < self._next_evict_check:
            return
        self._next_evict_check = now + 1.0
        try:
            rows = list(self.client.get_prefix(self.keys.evicted))
        except Exception:  # the next check retries; eviction is never urgent here
            return
        for value, meta in rows:
            mid = meta.key.decode()[len(self.keys.evicted) :]
            w = self.workers.get(mid)
            if w is not None and w.proc.returncode is None and mid not in self._killed:
                self._killed.add(mid)
                self.events.emit(
                    Event.EVICTED,
                    f"worker {mid} was evicted as hung "
                    f"({value.decode(errors='replace')}): killing it",
                    member=mid,
                )
                _signal(w.proc, signal.SIGKILL)

    def _shutdown(self) -> None:
        for w in self.workers.values():
            _signal(w.proc, signal.SIGKILL)
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.close()
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.etcd_server is not None:
            self.etcd_server.stop()
        events = getattr(self, "events", None)
        if events is not None:
            events.close()


def _share_cores(env: dict[str, str], nproc: int) -> None:
    """One intra-op thread per worker unless the user chose a count.

    Each torch process otherwise starts one thread per core and N local workers
    oversubscribe the machine N-fold (torchrun sets 1 for the same reason).
    It is 1 whatever N is: the thread count changes how CPU kernels split their
    reductions, and workers started by launchers with different N must compute
    bitwise the same gradients for ``grad_shards`` to be exact.
    """
    env.setdefault("OMP_NUM_THREADS", "1")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.returncode is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a frozen worker must see the next signal
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


# -- torchrun compatibility -------------------------------------------------------


def _run_torchrun_compat(args: argparse.Namespace) -> int:
    """Run an unmodified torchrun script: restart every worker on any failure."""
    job = args.job or f"job-{uuid.uuid4().hex[:8]}"
    events = EventLog(
        os.path.abspath(args.event_log or f"elastic-{job}.events.jsonl"),
        source=f"launcher-{os.getpid()}",
        console=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    n = args.nproc
    procs: list[subprocess.Popen] = []
    try:
        for attempt in range(args.max_restarts + 1):
            # A fresh port per attempt: a restarted group must never meet a
            # store left over from the failed one.
            port = free_port()
            exits: queue.Queue = queue.Queue()
            procs = []
            for rank in range(n):
                env = dict(os.environ)
                env.update(
                    {
                        "RANK": str(rank),
                        "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(n),
                        "LOCAL_WORLD_SIZE": str(n),
                        "GROUP_RANK": "0",
                        "ROLE_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port),
                        "TORCHELASTIC_RESTART_COUNT": str(attempt),
                        "TORCHELASTIC_MAX_RESTARTS": str(args.max_restarts),
                        "TORCHELASTIC_RUN_ID": job,
                        "PYTHONUNBUFFERED": "1",
                    }
                )
                _share_cores(env, n)
                proc = subprocess.Popen(
                    dying_with_parent([sys.executable, args.script, *args.script_args]),
                    env=env,
                    start_new_session=True,
                )
                procs.append(proc)
                threading.Thread(
                    target=lambda p=proc, r=rank, q=exits: q.put((r, p.wait())), daemon=True
                ).start()
            events.emit(
                Event.SPAWN,
                f"attempt {attempt}: started {n} worker(s) on port {port}",
                attempt=attempt,
                port=port,
            )
            failed_rank = None
            finished = 0
            while finished < n and failed_rank is None:
                if stop.is_set():
                    return EXIT_INTERRUPTED
                try:
                    rank, rc = exits.get(timeout=0.5)
                except queue.Empty:
                    continue
                if rc == 0:
                    finished += 1
                else:
                    failed_rank = rank
                    events.emit(
                        Event.EXIT,
                        f"rank {rank} exited with {rc}: restarting all workers",
                        rank=rank,
                        rc=rc,
                        attempt=attempt,
                    )
            if failed_rank is None:
                events.emit(Event.DONE, "all workers finished")
                return 0
            _stop_all(procs)
        events.emit(Event.GIVE_UP, f"no restarts left ({args.max_restarts})")
        return EXIT_FAILED
    finally:
        _stop_all(procs)
        events.close()


def _stop_all(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    for p in procs:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait(timeout=10)
