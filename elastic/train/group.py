"""One torch.distributed process group per generation, re-formed in-process.

Every worker hosts a TCPStore server for its whole life and publishes its
address in its member record; a generation uses the store of its rank 0 under
the prefix ``{job}/g{generation}/``. So the store never lives only in a process
that may already be dead (a new rank 0 brings a live store), and no key of a
dead generation can be read by a new one.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..base.addr import HostAddress, local_address, mixed_hosts, split_hostport
from ..base.errors import CollectiveTimeoutError, ConfigError, WorkerGroupError
from ..coord.world import World

log = logging.getLogger(__name__)


class StoreHost:
    """This process's TCPStore server, listening on this host's address only.

    TCPStore's own server listens on every interface whatever host it is
    given; handing it a socket bound to one address keeps a single-host job
    (this host's address on loopback) off the network.
    """

    def __init__(self, host: HostAddress | str = "127.0.0.1", timeout: float = 30.0) -> None:
        if isinstance(host, str):
            host = local_address(host, what="advertise_host")
        self.host = host
        sock = socket.socket(host.family, socket.SOCK_STREAM)
        try:
            sock.bind((host.ip, 0))
            sock.listen(512)
        except OSError as exc:
            sock.close()
            raise WorkerGroupError(f"cannot listen on {host.ip}: {exc}") from exc
        self.port = sock.getsockname()[1]
        # The store takes the descriptor over and closes it when it is destroyed.
        self.store = dist.TCPStore(
            host.ip,
            self.port,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout),
            master_listen_fd=sock.detach(),
        )

    @property
    def address(self) -> str:
        return self.host.hostport(self.port)


def default_backend() -> str:
    # gloo carries the CPU control and state traffic; NCCL the CUDA tensors.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


# A watch is called while a collective is pending with the seconds waited so
# far; it returns None to keep waiting or the reason to abandon the collective.
Watch = Callable[[float], "str | None"]

# How often a pending collective re-checks its watch. The wait itself wakes at
# once when the collective completes (a future callback), so this bounds only
# how late an abandon is noticed, not the step time.
WATCH_SLICE_S = 0.05


class _Graveyard:
    """Process groups abandoned with a collective still pending.

    gloo cannot cancel a pending collective (``abort()`` does not unblock it,
    measured), and destroying its process group joins the worker thread that
    runs it, so dropping the last reference would block the caller until the
    collective timeout. An abandoned group is parked here instead and released
    once every pending work has ended (it fails at the collective timeout at
    the latest), so what abandons leave behind is bounded by the abandon rate
    times the collective timeout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: list[tuple[object, list[dist.Work]]] = []

    def park(self, pg: object, works: list[dist.Work]) -> None:
        with self._lock:
            self._parked.append((pg, works))
        self.reap()

    def reap(self) -> int:
        """Release groups whose works ended; returns how many stay parked."""
        with self._lock:
            done = [e for e in self._parked if all(w.is_completed() for w in e[1])]
            self._parked = [e for e in self._parked if e not in done]
            left = len(self._parked)
        done.clear()  # destructors run here, outside the lock, and do not block
        return left

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    def leak_at_exit(self) -> None:
        # At interpreter exit a parked group's destructor would hold the
        # process up to the collective timeout: keep the few still parked
        # alive (the process is ending; the OS reclaims them).
        with self._lock:
            for pg, _ in self._parked:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))


graveyard = _Graveyard()
atexit.register(graveyard.leak_at_exit)


class WorkerGroup:
    """The process group of one generation, as seen by one rank.

    Collectives run asynchronously and are waited on in slices; between slices
    ``watch`` may abandon the wait (the World changed, a peer hangs), which
    turns a frozen or partitioned peer into a re-form within a slice of the
    membership noticing, instead of a wait for the collective timeout.
    """

    def __init__(
        self,
        world: World,
        rank: int,
        store_host: StoreHost,
        *,
        timeout: float,
        backend: str | None = None,
        watch: Watch | None = None,
    ) -> None:
        self.world = world
        self.rank = rank
        self.size = world.size
        self.timeout = timeout
        self.backend = backend or default_backend()
        self.watch = watch
        self._client_store: dist.TCPStore | None = None
        self._store_host = store_host
        self._pending: list[dist.Work] = []
        # Side groups (state sent to a joiner beside the step's collectives)
        # and the transfers started on them.
        self._side: list[tuple[object, list[dist.Work]]] = []
        self.closed = False

    @property
    def generation(self) -> int:
        return self.world.generation

    def form(self) -> WorkerGroup:
        if dist.is_initialized():
            raise WorkerGroupError("a process group is still active; close it first")
        self._check_addresses()
        td = datetime.timedelta(seconds=self.timeout)
        # init_process_group ignores pg_options for gloo (torch 2.13 builds its
        # device from GLOO_SOCKET_IFNAME or the host name, which often resolves
        # to 127.0.0.1), so the interface owning this host's address is named
        # through the environment, read when the group is created. A value the
        # user set wins. gloo takes the interface's first address: for an IPv6
        # host address on an interface that also holds IPv4, that is the IPv4 one.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", self._store_host.host.interface)
        if "nccl" in self.backend:
            os.environ.setdefault("NCCL_SOCKET_IFNAME", self._store_host.host.interface)
            # A failed NCCL collective must raise in this process (so the rank
            # can re-form) instead of NCCL's watchdog tearing the process down
            # or a wait blocking forever; the user's explicit setting wins.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        t0 = time.monotonic()
        try:
            if self.rank == 0:
                base = self._store_host.store
            else:
                host, port = split_hostport(self.world.members[0].store)
                base = dist.TCPStore(
                    host, port, is_master=False, wait_for_workers=False, timeout=td
                )
                self._client_store = base
            store = dist.PrefixStore(self.world.store_prefix, base)
            # torch names the default group by a process-wide counter and
            # uses the name in its store keys. destroy_process_group() resets
            # it, but a failed init_process_group() does not: ranks with
            # different failure histories would then wait on different keys
            # forever (seen: every later generation timed out). Start each
            # generation from the same name.
            dist.distributed_c10d._world.group_count = 0
            dist.init_process_group(
                self.backend, store=store, rank=self.rank, world_size=self.size, timeout=td
            )
        except (RuntimeError, ValueError, OSError) as exc:
            self.close()
            raise self._error_after(t0)(
                f"forming generation {self.generation} (rank {self.rank}/{self.size}) failed: {exc}"
            ) from exc
        return self

    def _check_addresses(self) -> None:
        """A World mixing loopback and other hosts' addresses cannot connect.

        The member on loopback is the misconfigured one: it gets a ConfigError
        and leaves the job; the others fail this generation only and re-form
        once it has gone.
        """
        own = self._store_host.host
        others = [(m.id, m.address) for r, m in enumerate(self.world.members) if r != self.rank]
        problem = mixed_hosts(own.ip, others)
        if problem is None:
            return
        if own.is_loopback:
            raise ConfigError(problem)
        raise WorkerGroupError(f"generation {self.generation}: {problem}")

    def close(self) -> None:
        """Tear the group down; on NCCL abort the communicators so nothing hangs."""
        if self.closed:
            return
        self.closed = True
        if dist.is_initialized():
            pending = [w for w in self._pending if not w.is_completed()]
            if pending:
                graveyard.park(dist.distributed_c10d._get_default_group(), pending)
            for pg, works in self._side:
                left = [w for w in works if not w.is_completed()]
                if left:
                    graveyard.park(pg, left)
            try:
                if torch.cuda.is_available():
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
            except Exception as exc:  # the group is gone either way
                log.debug("tearing down generation %d: %r", self.generation, exc)
        self._pending = []
        self._side = []
        self._client_store = None
        graveyard.reap()

    # -- collectives, with failures turned into one error type ---------------

    def _error_after(self, t0: float) -> type[WorkerGroupError]:
        """The type of a failure seen after waiting since ``t0``.

        torch gives a timed-out gloo or NCCL operation no type of its own, only
        a message; every timeout it applies is ``self.timeout``, counted from
        when the operation started, later than ``t0``. So having waited that
        long is what a timeout is.
        """
        timed_out = time.monotonic() - t0 >= self.timeout
        return CollectiveTimeoutError if timed_out else WorkerGroupError

    def _run(self, what: str, fn, *args, watch: Watch | None = None, **kwargs) -> None:
        t0 = time.monotonic()
        try:
            work = fn(*args, async_op=True, **kwargs)
            self._wait(what, work, watch or self.watch)
        except (RuntimeError, ValueError, OSError) as exc:
            raise self._error_after(t0)(
                f"{what} failed in generation {self.generation} (rank {self.rank}): {exc}"
            ) from exc

    def _wait(self, what: str, work: dist.Work, watch: Watch | None) -> None:
        done = threading.Event()
        work.get_future().then(lambda _f: done.set())
        self._pending.append(work)
        self._watch_until(done, what, watch)
        self._pending.remove(work)
        work.wait()  # raises the collective's error, if it failed

    def _watch_until(self, done: threading.Event, what: str, watch: Watch | None) -> None:
        """Wait for ``done`` in slices; between them ``watch`` may abandon the wait."""
        t0 = time.monotonic()
        # The backend's own timeout fails the work; the extra second only
        # covers a backend that does not honour it.
        deadline = t0 + self.timeout + 1.0
        while not done.wait(WATCH_SLICE_S):
            waited = time.monotonic() - t0
            reason = watch(waited) if watch is not None else None
            error: type[WorkerGroupError] = WorkerGroupError
            if reason is None and time.monotonic() > deadline:
                reason = f"no completion within the collective timeout ({self.timeout}s)"
                error = CollectiveTimeoutError
            if reason is not None:
                raise error(
                    f"{what} abandoned in generation {self.generation} (rank {self.rank}) "
                    f"after {waited:.2f}s: {reason}"
                )

    def start_all_reduce(self, tensor: torch.Tensor) -> tuple[dist.Work, float]:
        """Start a SUM all-reduce and return at once (gradient buckets launched
        from backward hooks); finish it with :meth:`finish`."""
        t0 = time.monotonic()
        try:
            work = dist.all_reduce(tensor, async_op=True)
        except (RuntimeError, ValueError, OSError) as exc:
            raise self._error_after(t0)(
                f"all_reduce failed in generation {self.generation} (rank {self.rank}): {exc}"
            ) from exc
        self._pending.append(work)  # parked, not dropped, if the group closes first
        return work, t0

    def finish(self, started: tuple[dist.Work, float], watch: Watch | None = None) -> None:
        """Wait for an all-reduce :meth:`start_all_reduce` began, as a blocking one waits."""
        work, t0 = started
        self._pending.remove(work)
        try:
            self._wait("all_reduce", work, watch or self.watch)
        except (RuntimeError, ValueError, OSError) as exc:
            raise self._error_after(t0)(
                f"all_reduce failed in generation {self.generation} (rank {self.rank}): {exc}"
            ) from exc

    def all_reduce(
        self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, watch: Watch | None = None
    ) -> None:
        """``watch`` replaces the group's watch for this collective."""
        self._run("all_reduce", dist.all_reduce, tensor, op=op, watch=watch)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self._run("broadcast", dist.broadcast, tensor, src=src)

    def all_gather_int(self, value: int) -> list[int]:
        t = torch.tensor([value], dtype=torch.int64)
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._run("all_gather", dist.all_gather, out, t)
        return [int(x.item()) for x in out]

    def broadcast_bytes(self, payload: bytes | None, src: int) -> bytes:
        """Send ``payload`` from ``src`` to every rank (length first, then bytes)."""
        n = torch.tensor([len(payload) if self.rank == src else 0], dtype=torch.int64)
        self.broadcast(n, src)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if buf.numel():
            self.broadcast(buf, src)
        return buf.numpy().tobytes()

    # -- point-to-point transfers on a side group ------------------------------

    def side_group(self) -> object:
        """A second group over the same ranks, so that a transfer runs beside the
        step's collectives instead of queued behind or between them (a collective
        of every rank: all of them call it, in the same order)."""
        t0 = time.monotonic()
        try:
            pg = dist.new_group(
                ranks=list(range(self.size)),
                backend=self.backend,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise self._error_after(t0)(
                f"forming a side group in generation {self.generation} (rank {self.rank}) "
                f"failed: {exc}"
            ) from exc
        self._side.append((pg, []))
        return pg

    def start_p2p(self, pg: object, tensor: torch.Tensor, peer: int, tag: int, send: bool):
        """Start sending ``tensor`` to (or receiving it from) rank ``peer`` on
        side group ``pg``; wait for it with :meth:`wait_p2p`."""
        t0 = time.monotonic()
        op = dist.isend if send else dist.irecv
        try:
            work = op(tensor, peer, group=pg, tag=tag)
        except (RuntimeError, ValueError, OSError) as exc:
            raise self._error_after(t0)(
                f"{'send to' if send else 'receive from'} rank {peer} failed in generation "
                f"{self.generation} (rank {self.rank}): {exc}"
            ) from exc
        for side, works in self._side:
            if side is pg:
                works.append(work)
        return work, t0

    def wait_p2p(self, started: list, watch: Watch | None = None) -> None:
        """Wait for transfers :meth:`start_p2p` began, in slices as a collective.

        gloo's point-to-point works have no future and report completion only
        from ``wait()``, which blocks: a thread waits on them (the backend's own
        timeout ends it at the latest) while this one watches."""
        if not started:
            return
        done = threading.Event()
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                for work, _ in started:
                    work.wait()
            except BaseException as exc:  # handed to the watching thread
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=waiter, name="elastic-transfer-wait", daemon=True).start()
        self._watch_until(done, "state transfer", watch or self.watch)
        if errors:
            raise self._error_after(started[0][1])(
                f"state transfer failed in generation {self.generation} "
                f"(rank {self.rank}): {errors[0]}"
            ) from errors[0]


def local_device() -> torch.device:
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
