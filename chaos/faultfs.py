"""FaultyFileSystem: wrap any fsspec filesystem and inject storage faults on purpose.

Every I/O call through the wrapper (open for reading, create = open for writing,
read, write, flush, close, cat, pipe, ls, info, exists, rm, mkdir, rmdir, mv,
copy, link) is numbered from 1 and
recorded in `fs.log`, so a test can first count the calls of an operation and
then replay it with a fault at each boundary in turn.

Faults, each matching an op set and a path glob, from the n-th matching call on:

* ``fail``      raise an error (by default `InjectedFault`, a ConnectionError, which
                the checkpoint store treats as transient); ``times=N`` fails N
                matching calls and then lets them through, ``times=None`` fails forever;
* ``delay``     sleep before the call;
* ``truncate``  keep only a fraction of the bytes of a write (the caller is told all
                were written) or of a read;
* ``bitflip``   flip one bit (at a seeded random position) of the bytes written or read;
* ``crash``     raise `SimulatedCrash` (a BaseException, so `except Exception` does
                not swallow it) and refuse all later I/O, like a process that died:
                files open for writing are abandoned without being committed.

`FaultPlan(crash_at=k)` crashes at the k-th I/O call whatever it is.  A seed makes
random bit positions and probabilistic faults reproducible.

    fs = FaultyFileSystem(fsspec.filesystem("memory"), FaultPlan(crash_at=7, seed=1))
    store = CheckpointStore("memory://run", fs=fs)
"""

from __future__ import annotations

import fnmatch
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

if TYPE_CHECKING:
    from typing_extensions import Unpack

OPS = frozenset(
    {
        "open",
        "create",
        "read",
        "write",
        "flush",
        "close",
        "cat",
        "pipe",
        "ls",
        "info",
        "exists",
        "rm",
        "mkdir",
        "rmdir",
        "mv",
        "copy",
        "link",
    }
)
DATA_READS = frozenset({"read", "cat"})
DATA_WRITES = frozenset({"write", "pipe"})
# Calls that change storage (a read-only location refuses these; reads' close is not one).
MUTATIONS = frozenset({"create", "write", "pipe", "rm", "mkdir", "rmdir", "mv", "copy", "link"})
ACTIONS = ("fail", "delay", "truncate", "bitflip", "crash")


class SimulatedCrash(BaseException):
    """The simulated process died at an I/O call; every later call raises it too."""


class InjectedFault(ConnectionError):
    """A transient-looking storage error injected by a `fail` fault."""


class IOCall(NamedTuple):
    index: int  # 1-based, over all calls through the filesystem
    op: str
    path: str


class When(TypedDict, total=False):
    """Which of the matching calls the `Fault` constructors' fault affects (the
    defaults are `Fault`'s: from the first, once, always)."""

    nth: int
    times: int | None
    probability: float


@dataclass(frozen=True)
class Fault:
    """One programmable fault; see the module docstring.  Prefer the constructors
    `Fault.fail`, `Fault.delay`, `Fault.truncate`, `Fault.bitflip`, `Fault.crash`."""

    action: str
    ops: frozenset[str] | None = None  # None: every op (data faults: their data ops)
    path: str = "*"  # fnmatch pattern on the path as the caller passed it
    nth: int = 1  # the first matching call affected (1-based)
    times: int | None = 1  # how many matching calls are affected; None = all from nth on
    delay_s: float = 0.0
    error: Callable[[str], BaseException] = InjectedFault
    keep: float = 0.5  # truncate: fraction of the bytes kept
    probability: float = 1.0  # each eligible call is affected with this probability

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Fault.action must be one of {ACTIONS}, got {self.action!r}")
        ops = self.ops
        if ops is None and self.action in ("truncate", "bitflip"):
            ops = DATA_WRITES
        if ops is not None:
            ops = frozenset([ops] if isinstance(ops, str) else ops)
            unknown = ops - OPS
            if unknown:
                raise ValueError(f"unknown op(s) {sorted(unknown)}; known: {sorted(OPS)}")
            if self.action in ("truncate", "bitflip") and not ops <= DATA_READS | DATA_WRITES:
                data_ops = sorted(DATA_READS | DATA_WRITES)
                raise ValueError(
                    f"a {self.action} fault applies to data ops {data_ops}, got {sorted(ops)}"
                )
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.nth, int) or self.nth < 1:
            raise ValueError(f"Fault.nth must be an int >= 1, got {self.nth!r}")
        if self.times is not None and (not isinstance(self.times, int) or self.times < 1):
            raise ValueError(f"Fault.times must be None or an int >= 1, got {self.times!r}")
        if self.delay_s < 0:
            raise ValueError(f"Fault.delay_s must be >= 0, got {self.delay_s!r}")
        if not 0.0 <= self.keep < 1.0:
            raise ValueError(f"Fault.keep must be in [0, 1), got {self.keep!r}")
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"Fault.probability must be in (0, 1], got {self.probability!r}")

    @classmethod
    def fail(
        cls,
        ops: Iterable[str] | str | None = None,
        path: str = "*",
        *,
        error: Callable[[str], BaseException] = InjectedFault,
        **when: Unpack[When],
    ) -> Fault:
        """Fail `times` matching calls from the `nth` on (None: permanently)."""
        return cls("fail", _ops(ops), path, error=error, **_when(when))

    @classmethod
    def delay(
        cls,
        seconds: float,
        ops: Iterable[str] | str | None = None,
        path: str = "*",
        **when: Unpack[When],
    ) -> Fault:
        return cls("delay", _ops(ops), path, delay_s=seconds, **_when(when))

    @classmethod
    def truncate(
        cls,
        ops: Iterable[str] | str | None = None,
        path: str = "*",
        *,
        keep: float = 0.5,
        **when: Unpack[When],
    ) -> Fault:
        return cls("truncate", _ops(ops), path, keep=keep, **_when(when))

    @classmethod
    def bitflip(
        cls, ops: Iterable[str] | str | None = None, path: str = "*", **when: Unpack[When]
    ) -> Fault:
        return cls("bitflip", _ops(ops), path, **_when(when))

    @classmethod
    def crash(
        cls, ops: Iterable[str] | str | None = None, path: str = "*", *, nth: int = 1
    ) -> Fault:
        return cls("crash", _ops(ops), path, nth, 1)

    def matches(self, op: str, path: str) -> bool:
        return (self.ops is None or op in self.ops) and fnmatch.fnmatchcase(path, self.path)


def _when(when: When) -> When:
    unknown = sorted(set(when) - When.__optional_keys__)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return when


def _ops(ops: Iterable[str] | str | None) -> frozenset[str] | None:
    if ops is None:
        return None
    return frozenset([ops] if isinstance(ops, str) else ops)


@dataclass(frozen=True)
class FaultPlan:
    """Faults to inject, an optional crash at the `crash_at`-th I/O call, and a seed."""

    faults: tuple[Fault, ...] = ()
    crash_at: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", tuple(self.faults))
        if self.crash_at is not None and (not isinstance(self.crash_at, int) or self.crash_at < 1):
            raise ValueError(
                f"FaultPlan.crash_at must be None or an int >= 1, got {self.crash_at!r}"
            )


@dataclass
class _Effects:
    """What the gate decided for one call besides raising."""

    delay_s: float = 0.0
    data: list[Fault] = field(default_factory=list)


class FaultyFileSystem(AbstractFileSystem):
    """An fsspec filesystem that forwards to `fs`, injecting the faults of `plan`.

    Paths are passed to `fs` unchanged (use the wrapped filesystem's path form).
    """

    protocol = "faulty"
    cachable = False  # every wrapper has its own plan and counters

    def __init__(self, fs: AbstractFileSystem, plan: FaultPlan | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.fs = fs
        self._lock = threading.Lock()
        self._files: weakref.WeakSet[FaultyFile] = weakref.WeakSet()
        self.reset(plan)

    # -- plan and bookkeeping ------------------------------------------------

    def reset(self, plan: FaultPlan | None = None) -> None:
        """Install `plan` (default: no faults) and clear counters, log and crash state."""
        with self._lock:
            self.plan = plan or FaultPlan()
            self.calls = 0
            self.log: list[IOCall] = []
            self.crashed = False
            self._matched = [0] * len(self.plan.faults)
            self._hits = [0] * len(self.plan.faults)
            self._rng = random.Random(self.plan.seed)

    def count(self, ops: Iterable[str] | str | None = None) -> int:
        """How many calls (of `ops`, default all) went through so far."""
        wanted = _ops(ops)
        return sum(1 for call in self.log if wanted is None or call.op in wanted)

    @property
    def local_file(self) -> bool:  # type: ignore[override]
        # Callers that special-case local disk (fsync, rename) see through the wrapper.
        return bool(getattr(self.fs, "local_file", False))

    def _crash(self, message: str) -> SimulatedCrash:
        self.crashed = True
        for f in list(self._files):
            f._abandon()
        return SimulatedCrash(message)

    def _gate(self, op: str, path: str) -> _Effects:
        effects = _Effects()
        with self._lock:
            if self.crashed:
                raise SimulatedCrash(f"I/O after a simulated crash: {op} {path}")
            self.calls += 1
            index = self.calls
            self.log.append(IOCall(index, op, str(path)))
            if self.plan.crash_at == index:
                raise self._crash(f"simulated crash at I/O call #{index}: {op} {path}")
            for i, fault in enumerate(self.plan.faults):
                if not fault.matches(op, str(path)):
                    continue
                self._matched[i] += 1
                if self._matched[i] < fault.nth:
                    continue
                if fault.times is not None and self._hits[i] >= fault.times:
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                self._hits[i] += 1
                if fault.action == "crash":
                    raise self._crash(f"simulated crash at I/O call #{index}: {op} {path}")
                if fault.action == "fail":
                    raise fault.error(f"injected fault at I/O call #{index}: {op} {path}")
                if fault.action == "delay":
                    effects.delay_s += fault.delay_s
                elif op in DATA_READS | DATA_WRITES:
                    effects.data.append(fault)
        if effects.delay_s:
            time.sleep(effects.delay_s)  # the injected latency itself
        return effects

    def _mangle(self, data: bytes, faults: list[Fault]) -> bytes:
        if not faults:
            return data
        buf = bytearray(data)
        for fault in faults:
            if fault.action == "truncate":
                del buf[int(len(buf) * fault.keep) :]
            elif fault.action == "bitflip" and buf:
                with self._lock:
                    bit = self._rng.randrange(len(buf) * 8)
                buf[bit // 8] ^= 1 << (bit % 8)
        return bytes(buf)

    # -- filesystem API --------------------------------------------------------

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> FaultyFile:
        self._gate("open" if set(mode) <= {"r", "b", "t"} else "create", path)
        inner = self.fs.open(
            path, mode, block_size=block_size, cache_options=cache_options, **kwargs
        )
        f = FaultyFile(self, inner, path, mode)
        self._files.add(f)
        return f

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> bytes:
        effects = self._gate("cat", path)
        return self._mangle(self.fs.cat_file(path, start=start, end=end, **kw), effects.data)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        effects = self._gate("pipe", path)
        self.fs.pipe_file(path, self._mangle(bytes(value), effects.data), mode=mode, **kw)

    def ls(self, path: str, detail: bool = True, **kw: Any) -> list[Any]:
        self._gate("ls", path)
        return self.fs.ls(path, detail=detail, **kw)

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kw: Any,
    ) -> Any:
        self._gate("ls", path)
        return self.fs.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kw)

    def info(self, path: str, **kw: Any) -> dict[str, Any]:
        self._gate("info", path)
        return self.fs.info(path, **kw)

    def exists(self, path: str, **kw: Any) -> bool:
        self._gate("exists", path)
        return self.fs.exists(path, **kw)

    def modified(self, path: str) -> Any:
        self._gate("info", path)
        return self.fs.modified(path)

    def created(self, path: str) -> Any:
        self._gate("info", path)
        return self.fs.created(path)

    def rm_file(self, path: str) -> None:
        self._gate("rm", path)
        self.fs.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._gate("rm", path if isinstance(path, str) else ",".join(path))
        self.fs.rm(path, recursive=recursive, maxdepth=maxdepth)

    def mkdir(self, path: str, create_parents: bool = True, **kw: Any) -> None:
        self._gate("mkdir", path)
        self.fs.mkdir(path, create_parents=create_parents, **kw)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._gate("mkdir", path)
        self.fs.makedirs(path, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        self._gate("rmdir", path)
        self.fs.rmdir(path)

    def mv(self, path1: str, path2: str, **kw: Any) -> None:
        self._gate("mv", path1)
        self.fs.mv(path1, path2, **kw)

    def cp_file(self, path1: str, path2: str, **kw: Any) -> None:
        self._gate("copy", path1)
        self.fs.cp_file(path1, path2, **kw)

    def link(self, src: str, dst: str, **kw: Any) -> None:
        if not hasattr(self.fs, "link"):
            raise NotImplementedError(f"{type(self.fs).__name__} has no hard links")
        self._gate("link", src)
        self.fs.link(src, dst, **kw)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.fs.invalidate_cache(path)


class FaultyFile:
    """A file of a FaultyFileSystem: data calls are gated, counted and mangled."""

    def __init__(self, owner: FaultyFileSystem, inner: Any, path: str, mode: str) -> None:
        self._owner = owner
        self._inner = inner
        self.path = path
        self.mode = mode
        self._closed = False

    def _gate(self, op: str) -> _Effects:
        try:
            return self._owner._gate(op, self.path)
        except SimulatedCrash:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """Drop the file as a dead process would: nothing more is written or committed."""
        if self._closed:
            return
        self._closed = True
        inner = self._inner
        if isinstance(inner, AbstractBufferedFile) and "r" not in inner.mode:
            try:
                inner.discard()  # e.g. abort the multipart upload: the object never appears
            except Exception:
                pass  # best effort: the process is "dead"
            inner.closed = True
        elif hasattr(getattr(inner, "f", None), "raw"):
            # Local file: close the descriptor under the buffer.  Bytes that reached the
            # kernel stay; bytes still in the process's buffer are lost, as in a real death.
            inner.f.raw.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, size: int = -1) -> bytes:
        effects = self._gate("read")
        return self._owner._mangle(self._inner.read(size), effects.data)

    def readinto(self, buffer: Any) -> int:
        effects = self._gate("read")
        view = memoryview(buffer).cast("B")
        if hasattr(self._inner, "readinto"):
            n = self._inner.readinto(view) or 0
        else:
            data = self._inner.read(len(view))
            n = len(data)
            view[:n] = data
        if effects.data:
            mangled = self._owner._mangle(bytes(view[:n]), effects.data)
            n = len(mangled)
            view[:n] = mangled
        return n

    def write(self, data: Any) -> int:
        effects = self._gate("write")
        n = len(memoryview(data).cast("B"))
        payload = self._owner._mangle(bytes(data), effects.data) if effects.data else data
        self._inner.write(payload)
        return n

    def flush(self) -> None:
        self._gate("flush")
        self._inner.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._gate("close")
        self._closed = True
        self._inner.close()

    def fileno(self) -> int:
        return self._inner.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readable(self) -> bool:
        return "r" in self.mode

    def writable(self) -> bool:
        return "r" not in self.mode

    def seekable(self) -> bool:
        return True

    def __enter__(self) -> FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
