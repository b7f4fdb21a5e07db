"""CheckpointStore: save / save_async / load / list / verify / prune / gc on any fsspec URL.

Commit protocol (one step, W ranks, generation G):

1. Every rank writes its share of the replicated state and its own per-rank
   state to shard files under `step-N/gG/r<rank>-<random>/`, checksumming while
   writing; on local disk the files and their directories are fsynced.
2. Ranks other than 0 then put a part record `step-N/gG/part-<rank>.json`
   listing their files, sizes, checksums and tensor pieces, and return.
3. Rank 0 (the committer) polls storage until all W-1 part records exist (or
   its timeout expires: nothing is committed and the error names the missing
   ranks), calls `fence(step)` exactly once, and if the fence says generation G
   is still current writes `step-N/manifest.json` with one create-only put.

A checkpoint exists exactly when its manifest does.  No collective is used, so
saves can run on background threads while training owns the process group.

The location is not trusted (others may write there): every path read from it
is confined below the root (`layout.check_relative`, and on local disk no
symlink may lead out), every record field is checked before use, retention
deletes only files named as a save names them, and a store given a `key`
signs what it writes and refuses what is not signed with that key.  A save that
finds an unreadable manifest at its step moves it aside (it was never a
commit: a commit is one atomic create) instead of mistaking it for one.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from fsspec import AbstractFileSystem

from storage import layout
from storage.checksum import ALGORITHMS
from storage.claim import Claim, decode_claim, encode_claim
from storage.compat import same_state
from storage.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FenceError,
    InvalidArgumentError,
    LocationClaimedError,
    MissingPartsError,
    SaveAbandonedError,
    SaveTimeoutError,
    SignatureError,
    StaleWriterError,
    StateMismatchError,
    StorageAccessError,
    StorageError,
    UnsafePathError,
    UnsignedError,
)
from storage.fsio import StorageIO, process_local
from storage.handle import SaveHandle
from storage.info import CheckpointInfo, LoadedCheckpoint, StepReport, VerifyReport
from storage.manifest import (
    MAX_RECORD_BYTES,
    FileEntry,
    Manifest,
    PartRecord,
    TensorEntry,
    decode_manifest,
    decode_part,
    encode_manifest,
    encode_part,
)
from storage.reader import FileProblem, allocate, read_files
from storage.retention import leftover_is_garbage, steps_to_keep
from storage.retry import RetryPolicy
from storage.serialize import decode_tree
from storage.signing import check_key
from storage.staging import StagingBuffer
from storage.writer import PreparedSave, prepare, write_part

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

Fence = Callable[[int], bool]
DEFAULT_TIMEOUT_S = 300.0


class SaveOptions(TypedDict, total=False):
    """The keywords of `CheckpointStore.save` and `save_async`, all optional.

    generation (0): the writer's generation, the fencing token the manifest records.
    fence (None): `fence(step)`, called once on rank 0 right before the commit.
    metadata (None): a JSON-able mapping stored in the manifest.
    rank (0), world_size (1): this rank's place in the job.
    per_rank_state (None): this rank's own state, saved next to the replicated one.
    timeout (DEFAULT_TIMEOUT_S): seconds; see `CheckpointStore.save`.
    abandon (None): polled by rank 0 while it waits for parts; see `CheckpointStore.save`.
    """

    generation: int
    fence: Fence | None
    metadata: Mapping[str, Any] | None
    rank: int
    world_size: int
    per_rank_state: Mapping[str, Any] | None
    timeout: float
    abandon: Callable[[], bool] | None


@dataclass(frozen=True)
class StoreConfig:
    """Tuning knobs; the defaults suit local disk and S3 alike.

    max_file_bytes: largest shard file; a rank's share is split into files of this
        size at most, written in parallel by `io_threads` threads.
    chunk_bytes: size of each write/read call.
    checksum: "crc32" (default, fast) or "sha256".
    gc_grace_s: uncommitted files untouched this long are treated as abandoned.
    poll_initial_s / poll_max_s: backoff of the committer polling for part records.
    keep_snapshot_buffer: keep the CPU buffer of `save_async` snapshots between saves
        (see `storage.staging`): the snapshot then copies at memory speed instead of
        page-faulting fresh memory, at the cost of holding this rank's share of the
        state between saves.  False frees it after every save.
    """

    max_file_bytes: int = 256 * 2**20
    io_threads: int = 4
    chunk_bytes: int = 8 * 2**20
    checksum: str = "crc32"
    gc_grace_s: float = 3600.0
    # Rank 0 commits this long after the last part lands at worst; a poll is one small read.
    poll_initial_s: float = 0.01
    poll_max_s: float = 0.2
    keep_snapshot_buffer: bool = True

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "io_threads", "chunk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"StoreConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("gc_grace_s", "poll_initial_s", "poll_max_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise InvalidArgumentError(
                    f"StoreConfig.{name} must be a number > 0, got {value!r}"
                )
        if not isinstance(self.keep_snapshot_buffer, bool):
            raise InvalidArgumentError(
                "StoreConfig.keep_snapshot_buffer must be a bool, "
                f"got {self.keep_snapshot_buffer!r}"
            )
        if self.checksum not in ALGORITHMS:
            raise InvalidArgumentError(
                f"StoreConfig.checksum must be one of {ALGORITHMS}, got {self.checksum!r}"
            )


def _check_timeout(timeout: float | None) -> float:
    if timeout is None or isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if timeout <= 0:
        raise InvalidArgumentError(f"timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
    return None


class CheckpointStore:
    """Checkpoints of one training run under one fsspec URL."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
        retry: RetryPolicy | None = None,
        config: StoreConfig | None = None,
        key: bytes | None = None,
    ) -> None:
        """`key`: sign manifests and part records with HMAC-SHA256 under it and refuse
        unsigned or badly signed ones; its files are then checksummed with SHA-256
        (a CRC can be forged to match altered bytes, so only that makes the
        signature cover the data)."""
        self._io = StorageIO(url, retry or RetryPolicy(), storage_options=storage_options, fs=fs)
        self.config = config or StoreConfig()
        self._key = None if key is None else check_key(key)
        self._algorithm = "sha256" if self._key is not None else self.config.checksum
        self._instance: str | None = None  # the claim this store commits under
        self._lock = threading.Lock()
        self._manifests: dict[int, Manifest] = {}  # committed manifests never change
        self._verified: set[int] = set()
        self._inflight: set[int] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: SaveHandle | None = None
        self._staging = StagingBuffer()

    @property
    def url(self) -> str:
        return self._io.url

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    @property
    def signed(self) -> bool:
        """Whether this store was given a key."""
        return self._key is not None

    def contains(self, url: str) -> bool:
        """Whether `url` names this location or something inside it."""
        return self._io.contains(url)

    @property
    def process_local(self) -> bool:
        """Whether only this process can see the location (memory://)."""
        return process_local(self._io.fs)

    # ------------------------------------------------------- location checks

    def probe(self) -> None:
        """Write and delete a small file at the root: StorageError (naming the location)
        unless checkpoints can be written there.  Cheap; run it before training."""
        rel = layout.probe_name()
        try:
            self._io.put(rel, b"probe\n", create_only=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StorageAccessError(
                f"checkpoint location {self.url} is not a writable directory ({exc})"
            ) from exc
        self._io.remove(rel, missing_ok=False)

    def current_claim(self) -> Claim | None:
        """The claim record at the root, None if there is none."""
        try:
            data = self._io.read_bytes(layout.CLAIM, MAX_RECORD_BYTES)
        except FileNotFoundError:
            return None
        return decode_claim(data, self._io.display(layout.CLAIM))

    def claim(self, instance: str, job: str, *, takeover: bool = False) -> Claim:
        """Make this launch (`instance` of `job`) the owner of the location; afterwards
        commits through this store are refused once the record names someone else.

        A claim by another instance raises LocationClaimedError naming it, unless
        `takeover` (resuming a job replaces whoever ran before).  Claiming again
        with the same instance is a no-op."""
        for name, value in (("instance", instance), ("job", job)):
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"claim {name} must be a non-empty str, got {value!r}")
        mine = Claim.here(job, instance)
        try:
            self._io.put(layout.CLAIM, encode_claim(mine), create_only=True)
        except FileExistsError:
            mine = self._claim_existing(mine, takeover)
        self._instance = instance
        return mine

    def _claim_existing(self, mine: Claim, takeover: bool) -> Claim:
        """`claim` when a record exists already: ours, taken over, or refused."""
        where = self._io.display(layout.CLAIM)
        try:
            current = self.current_claim()
        except CorruptCheckpointError as exc:
            if not takeover:
                raise LocationClaimedError(
                    f"{where} is unreadable ({exc}); remove it once no job uses "
                    f"{self.url}, or resume to take the location over"
                ) from exc
            current = None
        if current is not None and current.instance == mine.instance:
            return current
        if not takeover:
            owner = current.describe() if current is not None else "another launch"
            raise LocationClaimedError(
                f"{self.url} is claimed by {owner}; use another location, resume to take "
                f"it over, or remove {where} once that launch is gone"
            )
        self._io.put(layout.CLAIM, encode_claim(mine), create_only=False)
        if current is not None:
            log.warning("%s: took over from %s", self.url, current.describe())
        return mine

    def attach_claim(self, instance: str) -> None:
        """Commit only while the claim record names `instance` (made by another process
        of this launch, e.g. the launcher)."""
        if not isinstance(instance, str) or not instance:
            raise InvalidArgumentError(f"claim instance must be a non-empty str, got {instance!r}")
        self._instance = instance

    @property
    def claim_instance(self) -> str | None:
        return self._instance

    def check_claim(self) -> None:
        """LocationClaimedError when this store holds a claim and the record at the root
        names another instance (the location was taken over)."""
        if self._instance is None:
            return
        try:
            current = self.current_claim()
        except CorruptCheckpointError as exc:
            raise LocationClaimedError(
                f"{self.url}: the claim record became unreadable ({exc}); refused"
            ) from exc
        if current is not None and current.instance != self._instance:
            raise LocationClaimedError(
                f"{self.url} is now claimed by {current.describe()}, not by launch "
                f"{self._instance}; refused"
            )

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ saving

    def save(
        self, step: int, state: Mapping[str, Any], **options: Unpack[SaveOptions]
    ) -> CheckpointInfo:
        """Save synchronously; returns once committed (rank 0) or once this rank's part
        is durable (other ranks, `committed=False`).

        Every rank of a W-rank job calls this with the same replicated `state` and
        its own `per_rank_state`; each writes 1/W of the replicated bytes.  `fence(step)`
        is called once, on rank 0, right before the commit: False raises
        StaleWriterError and removes this generation's files.  `timeout` bounds
        waiting for a previous async save and, on rank 0, for the other ranks' parts.
        `abandon()`, polled by rank 0 while it waits for parts, ends that wait early
        with SaveAbandonedError when it returns True (the runtime passes "my
        generation is over": the fence would refuse the commit anyway, and a part of
        a dead rank never arrives).  The keywords and their defaults: `SaveOptions`.
        """
        _, persist = self._prepare("save", step, state, options, copy=False)
        return persist()

    def save_async(
        self, step: int, state: Mapping[str, Any], **options: Unpack[SaveOptions]
    ) -> SaveHandle:
        """Like `save`, but only the CPU snapshot happens on the calling thread.

        The snapshot copies just the bytes this rank writes, so the caller may change
        `state` as soon as this returns; it goes into a buffer kept between saves
        (`StoreConfig.keep_snapshot_buffer`, see `storage.staging`).  At most one save
        is in flight: this first waits (up to `timeout`) for the previous one, and
        raises its error if it failed and nobody saw the error through
        `SaveHandle.wait`.
        """
        prepared, persist = self._prepare("save_async", step, state, options, copy=True)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ckpt-save"
            )
        snapshot_bytes = prepared.held_bytes  # read now: the save frees it as it goes
        future = self._executor.submit(self._persist_logged, prepared.step, persist)
        handle = SaveHandle(step, future, snapshot_bytes)
        self._pending = handle
        return handle

    def _prepare(
        self,
        caller: str,
        step: int,
        state: Mapping[str, Any],
        options: SaveOptions,
        *,
        copy: bool,
    ) -> tuple[PreparedSave, Callable[[], CheckpointInfo]]:
        """The caller's-thread half of `save` and `save_async`: this rank's share
        planned (and with `copy` snapshot), and the rest of the save to run."""
        unknown = sorted(set(options) - SaveOptions.__optional_keys__)
        if unknown:
            raise TypeError(
                f"CheckpointStore.{caller}() got an unexpected keyword argument {unknown[0]!r}"
            )
        timeout = _check_timeout(options.get("timeout", DEFAULT_TIMEOUT_S))
        self._finish_pending(timeout)
        prepared = prepare(
            step,
            state,
            generation=options.get("generation", 0),
            rank=options.get("rank", 0),
            world_size=options.get("world_size", 1),
            per_rank_state=options.get("per_rank_state"),
            metadata=options.get("metadata"),
            copy=copy,
            staging=self._staging if copy and self.config.keep_snapshot_buffer else None,
        )
        persist = functools.partial(
            self._persist, prepared, options.get("fence"), timeout, options.get("abandon")
        )
        return prepared, persist

    def wait(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Wait for the in-flight asynchronous save, raising its error if unseen."""
        self._finish_pending(_check_timeout(timeout))

    def close(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Finish the in-flight save (raising its error) and stop the background thread."""
        try:
            self.wait(timeout)
        finally:
            if self._executor is not None and (self._pending is None or self._pending.done()):
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._pending is None or self._pending.done():
                self._staging.free()

    def _finish_pending(self, timeout: float) -> None:
        handle = self._pending
        if handle is None:
            return
        if not handle.join(timeout):
            raise SaveTimeoutError(
                f"the previous asynchronous save (step {handle.step}) is still running "
                f"after {timeout}s; at most one save may be in flight"
            )
        self._pending = None
        error = handle.unreported_error()
        if error is not None:
            raise error

    def _persist_logged(self, step: int, persist: Callable[[], CheckpointInfo]) -> CheckpointInfo:
        try:
            return persist()
        except BaseException as exc:
            log.error(
                "background save of step %d to %s failed: %s: %s",
                step,
                self.url,
                type(exc).__name__,
                exc,
            )
            raise

    def _persist(
        self,
        prepared: PreparedSave,
        fence: Fence | None,
        timeout: float,
        abandon: Callable[[], bool] | None = None,
    ) -> CheckpointInfo:
        deadline = time.monotonic() + timeout
        step_rel = layout.step_dir(prepared.step)
        with self._lock:
            self._inflight.add(prepared.step)
        try:
            self._refuse_committed(prepared.step, quarantine=prepared.rank == 0)
            part = write_part(
                self._io,
                prepared,
                algorithm=self._algorithm,
                max_file_bytes=self.config.max_file_bytes,
                chunk_bytes=self.config.chunk_bytes,
                io_threads=self.config.io_threads,
            )
            prepared.release()
            if prepared.rank != 0:
                record = layout.join(
                    step_rel, layout.part_record(prepared.generation, prepared.rank)
                )
                self._io.put(record, encode_part(part, self._key), create_only=False)
                return CheckpointInfo(
                    step=prepared.step,
                    generation=prepared.generation,
                    world_size=prepared.world_size,
                    url=self._io.display(step_rel),
                    created=time.time(),
                    num_files=len(part.files),
                    total_bytes=sum(f.size for f in part.files),
                    metadata=dict(prepared.metadata),
                    committed=False,
                )
            parts = {0: part}
            parts.update(self._wait_for_parts(prepared, deadline, timeout, abandon))
            manifest = self._build_manifest(prepared, parts)
            return self._commit(manifest, fence)
        finally:
            prepared.release()  # also on failure: a stored exception must not pin the snapshot
            with self._lock:
                self._inflight.discard(prepared.step)

    def _refuse_committed(self, step: int, *, quarantine: bool) -> None:
        """CheckpointExistsError if `step` is committed.  A manifest file that does not
        decode is not a commit (a commit is one atomic create of a whole, valid file):
        the save goes on, and the committer (`quarantine`) moves it aside and logs it."""
        rel = layout.join(layout.step_dir(step), layout.MANIFEST)
        where = self._io.display(rel)
        if not self._io.exists(rel):  # the common case, one cheap request
            return
        try:
            data = self._io.read_bytes(rel, MAX_RECORD_BYTES)
            existing = decode_manifest(data, where)  # a commit, signed or not, is never replaced
        except FileNotFoundError:
            return
        except UnsafePathError as exc:
            raise CorruptCheckpointError(
                f"step {step}: {exc}; remove it to save this step again; nothing was committed"
            ) from exc
        except CorruptCheckpointError as exc:
            if not quarantine:
                return
            torn = layout.join(layout.step_dir(step), layout.torn_name(layout.MANIFEST))
            try:
                self._io.move(rel, torn)
            except FileNotFoundError:
                return  # moved by someone else meanwhile
            with self._lock:
                self._manifests.pop(step, None)
            log.warning(
                "step %d under %s had an unreadable manifest (%s); moved aside to %s",
                step,
                self.url,
                exc,
                self._io.display(torn),
            )
            return
        raise CheckpointExistsError(
            f"step {step} is already committed under {self.url} (generation "
            f"{existing.generation}, {existing.signature}); a committed checkpoint is never "
            "overwritten"
        )

    def _wait_for_parts(
        self,
        prepared: PreparedSave,
        deadline: float,
        timeout: float,
        abandon: Callable[[], bool] | None = None,
    ) -> dict[int, PartRecord]:
        step_rel = layout.step_dir(prepared.step)
        missing = set(range(1, prepared.world_size))
        found: dict[int, PartRecord] = {}
        rejected: dict[int, str] = {}
        backoff = self.config.poll_initial_s
        gen_rel = layout.join(step_rel, layout.generation_dir(prepared.generation))
        while True:
            # One listing per poll, then reads of the records that appeared only.
            present = {entry["name"] for entry in self._io.ls(gen_rel)}
            for rank in sorted(missing):
                rel = layout.join(step_rel, layout.part_record(prepared.generation, rank))
                if layout.basename(rel) not in present:
                    continue
                try:
                    data = self._io.read_bytes(rel, MAX_RECORD_BYTES)
                    record = decode_part(data, self._io.display(rel), self._key)
                    self._check_part_paths(record, self._io.display(rel))
                except FileNotFoundError:
                    continue
                except CorruptCheckpointError as exc:
                    rejected[rank] = str(exc)
                    continue
                if (record.step, record.generation, record.rank, record.world_size) != (
                    prepared.step,
                    prepared.generation,
                    rank,
                    prepared.world_size,
                ) or record.plan_id != prepared.plan_id:
                    # Perhaps left by an earlier attempt; the current one may still replace it.
                    rejected[rank] = "part record describes a different state layout or world"
                    continue
                found[rank] = record
                missing.discard(rank)
                rejected.pop(rank, None)
            if not missing:
                return found
            if abandon is not None and abandon():
                raise SaveAbandonedError(
                    f"step {prepared.step}, generation {prepared.generation}: abandoned while "
                    f"waiting for rank(s) {sorted(missing)} (the writers' generation ended); "
                    "nothing was committed"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                detail = "".join(f"; rank {r}: {why}" for r, why in sorted(rejected.items()))
                raise MissingPartsError(
                    f"step {prepared.step}, generation {prepared.generation}: no usable part from "
                    f"rank(s) {sorted(missing)} of world size {prepared.world_size} after "
                    f"{timeout:g}s (a rank died or is too slow){detail}; nothing was committed"
                )
            time.sleep(min(backoff, left))
            backoff = min(backoff * 2, self.config.poll_max_s)

    def _check_part_paths(self, record: PartRecord, where: str) -> None:
        """A part's files lie in its own writer directory of its generation, checksummed
        with this store's algorithm: nothing else may enter the manifest."""
        prefix = layout.generation_dir(record.generation) + "/"
        if not record.writer.startswith(prefix) or "/" in record.writer[len(prefix) :]:
            raise CorruptCheckpointError(f"{where}: writer {record.writer!r} is not a writer dir")
        for entry in record.files:
            if not layout.written_by_store(entry.path) or not entry.path.startswith(
                record.writer + "/"
            ):
                raise CorruptCheckpointError(f"{where}: file {entry.path!r} is not the writer's")
            if self._key is not None and not entry.checksum.startswith("sha256:"):
                raise SignatureError(f"{where}: {entry.path} is not checksummed with SHA-256")

    def _build_manifest(self, prepared: PreparedSave, parts: dict[int, PartRecord]) -> Manifest:
        files: list[FileEntry] = []
        tensors: dict[str, TensorEntry] = {}
        for rank in sorted(parts):
            files.extend(parts[rank].files)
            tensors.update(parts[rank].per_rank_tensors)
        for tid, spec in prepared.specs.items():
            locations = sorted(
                (loc for rank in sorted(parts) for loc in parts[rank].locations.get(tid, ())),
                key=lambda loc: loc.start,
            )
            entry = TensorEntry(spec.dtype, spec.shape, tuple(locations))
            if entry.stored_bytes != spec.nbytes:
                raise StorageError(
                    f"internal error: the parts of step {prepared.step} hold "
                    f"{entry.stored_bytes} of the {spec.nbytes} bytes of tensor {tid}"
                )
            tensors[tid] = entry
        return Manifest(
            step=prepared.step,
            generation=prepared.generation,
            world_size=prepared.world_size,
            plan_id=prepared.plan_id,
            commit_id=uuid.uuid4().hex,
            files=tuple(files),
            tensors=tensors,
            state=prepared.state,
            per_rank={rank: parts[rank].per_rank_state for rank in sorted(parts)},
            metadata=prepared.metadata,
        )

    def _commit(self, manifest: Manifest, fence: Fence | None) -> CheckpointInfo:
        step, generation = manifest.step, manifest.generation
        step_rel = layout.step_dir(step)
        if fence is not None:
            try:
                current = fence(step)
            except Exception as exc:
                raise FenceError(
                    f"fence for step {step} (generation {generation}) raised "
                    f"{type(exc).__name__}: {exc}; nothing was committed"
                ) from exc
            if not isinstance(current, bool):
                raise FenceError(
                    f"fence for step {step} returned {current!r}, expected True or False; "
                    "nothing was committed"
                )
            if not current:
                self._discard_generation(step, generation)
                raise StaleWriterError(
                    f"generation {generation} is no longer current: commit of step {step} "
                    f"to {self.url} refused and its files removed"
                )
        self.check_claim()
        rel = layout.join(step_rel, layout.MANIFEST)
        try:
            self._io.put(rel, encode_manifest(manifest, self._key), create_only=True)
        except FileExistsError:
            # A retried put whose first attempt landed finds its own manifest.
            existing = self._read_manifest(step)
            if existing.commit_id != manifest.commit_id:
                raise CheckpointExistsError(
                    f"step {step} was committed under {self.url} by generation "
                    f"{existing.generation} while this save ran; not overwritten"
                ) from None
        with self._lock:
            self._manifests[step] = manifest
        log.info("committed step %d (generation %d) to %s", step, generation, self.url)
        return CheckpointInfo.from_manifest(manifest, self._io.display(step_rel))

    def _discard_generation(self, step: int, generation: int) -> None:
        step_rel = layout.step_dir(step)
        gen = layout.generation_dir(generation)
        try:
            files = self._io.find(layout.join(step_rel, gen))
            self._remove_store_files(step_rel, [f"{gen}/{rel}" for rel in files])
            self._io.remove_empty_dirs(layout.join(step_rel, gen), keep_top=False)
        except StorageError as exc:
            log.warning(
                "could not remove the files of refused step %d at %s/%s: %s",
                step,
                step_rel,
                gen,
                exc,
            )

    def _remove_store_files(
        self, step_rel: str, rels: list[str], also: frozenset[str] = frozenset()
    ) -> list[str]:
        """Delete the files below `step_rel` that a save wrote (by name, or listed in
        `also`); foreign files and paths leading outside the location stay.
        Returns the removed paths, relative to the root."""
        doomed = []
        for rel in sorted(rels):
            if not (layout.written_by_store(rel) or rel in also):
                continue
            path = layout.join(step_rel, rel)
            if not self._io.confined(path):
                log.warning("not deleting %s: it leads outside the location", path)
                continue
            doomed.append(path)
        self._io.remove_many(doomed)
        return doomed

    # ----------------------------------------------------------------- reading

    def _step_numbers(self) -> list[int]:
        """Steps that have a directory (committed or not), ascending."""
        steps = (layout.parse_step_dir(e["name"]) for e in self._io.ls(""))
        return sorted(s for s in steps if s is not None)

    def _read_manifest(self, step: int) -> Manifest:
        """The manifest of `step` read from storage; FileNotFoundError if uncommitted."""
        rel = layout.join(layout.step_dir(step), layout.MANIFEST)
        where = self._io.display(rel)
        manifest = decode_manifest(self._io.read_bytes(rel, MAX_RECORD_BYTES), where, self._key)
        if manifest.step != step:
            raise CorruptCheckpointError(
                f"{where}: manifest is for step {manifest.step}, not {step}"
            )
        if self._key is not None:
            weak = [f.path for f in manifest.files if not f.checksum.startswith("sha256:")]
            if weak:
                raise SignatureError(
                    f"{where}: signed, but {weak[0]} is checksummed with a CRC that does not "
                    "protect against tampering; refused"
                )
        return manifest

    def _manifest(self, step: int) -> Manifest:
        with self._lock:
            cached = self._manifests.get(step)
        if cached is not None:
            return cached
        manifest = self._read_manifest(step)
        with self._lock:
            self._manifests[step] = manifest
        return manifest

    def _scan(self) -> list[tuple[int, Manifest | CorruptCheckpointError]]:
        """(step, manifest or why it is unreadable) for every step with a manifest file."""
        out: list[tuple[int, Manifest | CorruptCheckpointError]] = []
        for step in self._step_numbers():
            try:
                out.append((step, self._manifest(step)))
            except FileNotFoundError:
                continue
            except CorruptCheckpointError as exc:
                out.append((step, exc))
        return out

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, ascending by step (a step whose manifest is unreadable is
        left out with a warning; `verify` reports it)."""
        infos = []
        for step, manifest in self._scan():
            if isinstance(manifest, CorruptCheckpointError):
                log.warning("step %d under %s is not listed: %s", step, self.url, manifest)
                continue
            infos.append(
                CheckpointInfo.from_manifest(manifest, self._io.display(layout.step_dir(step)))
            )
        return infos

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (its manifest readable; data not verified)."""
        for step in reversed(self._step_numbers()):
            try:
                manifest = self._manifest(step)
            except FileNotFoundError:
                continue
            except CorruptCheckpointError as exc:
                log.warning("step %d under %s skipped: %s", step, self.url, exc)
                continue
            return CheckpointInfo.from_manifest(manifest, self._io.display(layout.step_dir(step)))
        return None

    def _not_found(self, step: int) -> CheckpointNotFoundError:
        available = [info.step for info in self.list()]
        listing = ", ".join(map(str, available)) if available else "none"
        return CheckpointNotFoundError(
            f"step {step} has no committed checkpoint under {self.url}; available steps: {listing}"
        )

    def _empty(self) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(f"no committed checkpoint under {self.url} (empty location)")

    def load(
        self, step: int | None = None, *, rank: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """(step, state) of the newest checkpoint that verifies, or of `step`.

        With `rank`, that rank's saved per-rank state is merged into the returned
        dict (an error if the checkpoint has none for it; use `load_checkpoint` to
        choose among the saved ranks after a change of world size).
        """
        loaded = self.load_checkpoint(step)
        state = dict(loaded.state)
        if rank is not None:
            own = loaded.per_rank.get(rank)
            if own is None:
                raise StateMismatchError(
                    f"step {loaded.step} was saved by {loaded.world_size} rank(s); there is no "
                    f"per-rank state for rank {rank} (use load_checkpoint() and choose)"
                )
            clash = sorted(set(own) & set(state))
            if clash:
                raise StateMismatchError(
                    f"per-rank keys {clash} of rank {rank} clash with replicated keys"
                )
            state.update(own)
        return loaded.step, state

    def load_checkpoint(self, step: int | None = None) -> LoadedCheckpoint:
        """The newest checkpoint whose files all exist and match their checksums, falling
        back to older ones (with a warning) — or exactly `step`, which must verify."""
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise InvalidArgumentError(f"step must be an int >= 0, got {step!r}")
            try:
                manifest = self._manifest(step)
            except FileNotFoundError:
                raise self._not_found(step) from None
            return self._load_manifest(manifest)
        candidates = list(reversed(self._step_numbers()))
        failures: list[str] = []
        for candidate in candidates:
            try:
                loaded = self._load_manifest(self._manifest(candidate))
            except FileNotFoundError:
                continue  # never committed (in flight or abandoned): not a fallback
            except CorruptCheckpointError as exc:
                log.warning(
                    "checkpoint step %d under %s failed verification, falling back to the "
                    "previous one: %s",
                    candidate,
                    self.url,
                    exc,
                )
                failures.append(str(exc))
                continue
            if failures:
                log.warning(
                    "loaded step %d under %s after %d newer checkpoint(s) failed verification",
                    loaded.step,
                    self.url,
                    len(failures),
                )
            return loaded
        if failures:
            raise CorruptCheckpointError(
                f"no checkpoint under {self.url} verifies: " + " | ".join(failures)
            )
        raise self._empty()

    def _check_sizes(self, manifest: Manifest) -> None:
        """Every file exists with its recorded size, before memory is allocated for what
        the manifest says the files hold (a forged size could ask for terabytes)."""
        step_rel = layout.step_dir(manifest.step)
        for entry in manifest.files:
            rel = layout.join(step_rel, entry.path)
            try:
                actual = self._io.size(rel)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"step {manifest.step}: {self._io.display(rel)}: missing"
                ) from None
            if actual != entry.size:
                raise CorruptCheckpointError(
                    f"step {manifest.step}: {self._io.display(rel)}: {actual} bytes, the "
                    f"manifest says {entry.size}"
                )

    def _load_manifest(self, manifest: Manifest) -> LoadedCheckpoint:
        self._check_sizes(manifest)
        try:
            dest = allocate(dict(manifest.tensors))
        except (RuntimeError, MemoryError) as exc:
            raise CorruptCheckpointError(
                f"step {manifest.step}: cannot allocate its tensors ({exc})"
            ) from exc
        problems = self._read_files(manifest, dest)
        if problems:
            raise CorruptCheckpointError("; ".join(map(str, problems)))
        with self._lock:
            self._verified.add(manifest.step)

        def tensor(tid: str) -> torch.Tensor:
            return dest[tid]

        return LoadedCheckpoint(
            step=manifest.step,
            state=decode_tree(manifest.state, tensor),
            per_rank={rank: decode_tree(tree, tensor) for rank, tree in manifest.per_rank.items()},
            generation=manifest.generation,
            world_size=manifest.world_size,
            metadata=dict(manifest.metadata),
        )

    def holds(self, step: int, state: Mapping[str, Any]) -> bool:
        """Whether `step` is committed, verifies, and holds exactly `state` (same keys,
        values, dtypes, shapes and bytes): a save that found its step committed
        already may count as done only then."""
        try:
            manifest = self._read_manifest(step)
        except FileNotFoundError:
            return False
        return same_state(self._load_manifest(manifest).state, state)

    # --------------------------------------------------------------- verifying

    def verify(self, step: int | None = None) -> VerifyReport:
        """Re-read every file of `step` (default: every committed step) and check it
        against the manifest; the report names each bad file and why."""
        if step is not None:
            steps = [step]
            try:
                self._read_manifest(step)
            except FileNotFoundError:
                raise self._not_found(step) from None
            except CorruptCheckpointError:
                pass  # reported below
        else:
            steps = self._step_numbers()
        reports = []
        for s in steps:
            report = self._verify_step(s)
            if report is not None:
                reports.append(report)
        if not reports:
            raise self._empty()
        return VerifyReport(self.url, tuple(reports))

    def _read_files(
        self, manifest: Manifest, dest: dict[str, torch.Tensor] | None
    ) -> list[FileProblem]:
        """Read and check every file of `manifest` (into `dest` when given)."""
        return read_files(
            self._io,
            manifest,
            dest,
            chunk_bytes=self.config.chunk_bytes,
            io_threads=self.config.io_threads,
        )

    def _verify_step(self, step: int) -> StepReport | None:
        """None when `step` is not committed."""
        rel = layout.join(layout.step_dir(step), layout.MANIFEST)
        try:
            manifest = self._read_manifest(step)  # re-read: the stored copy is what counts
        except FileNotFoundError:
            return None
        except CorruptCheckpointError as exc:
            signature = ""
            if isinstance(exc, UnsignedError):
                signature = "unsigned"
            elif isinstance(exc, SignatureError):
                signature = "bad signature"
            return StepReport(
                step,
                (FileProblem(step, self._io.display(rel), "manifest", str(exc)),),
                signature,
            )
        problems = self._read_files(manifest, None)
        with self._lock:
            if problems:
                self._verified.discard(step)
            else:
                self._verified.add(step)
        return StepReport(step, tuple(problems), manifest.signature)

    # --------------------------------------------------------------- retention

    def prune(
        self, keep_last: int, keep_every: int | None = None, *, verify: bool = True
    ) -> list[int]:
        """Delete committed checkpoints except the last `keep_last`, every `keep_every`-th
        step, and the newest one that verifies (checked with a full read unless
        `verify=False` or already verified by this store).  Returns the deleted steps."""
        scanned = self._scan()
        protect = None
        for step, manifest in reversed(scanned):
            if isinstance(manifest, CorruptCheckpointError):
                continue
            if not verify or step in self._verified:
                protect = step
                break
            report = self._verify_step(step)
            if report is not None and report.ok:
                protect = step
                break
        keep = steps_to_keep((s for s, _ in scanned), keep_last, keep_every, protect)
        deleted = []
        for step, manifest in scanned:
            if step not in keep:
                self._delete_step(step, manifest if isinstance(manifest, Manifest) else None)
                deleted.append(step)
        if deleted:
            log.info("pruned steps %s from %s", deleted, self.url)
        return deleted

    def _delete_step(self, step: int, manifest: Manifest | None) -> None:
        """Delete what the store wrote for `step`: its manifest first, then the files it
        lists and every file named as a save names them (quarantined manifests too);
        files someone else put there stay, and so does their directory."""
        step_rel = layout.step_dir(step)
        # Uncommit first: a crash after this leaves garbage for gc, never a torn checkpoint.
        manifest_rel = layout.join(step_rel, layout.MANIFEST)
        if self._io.confined(manifest_rel):
            self._io.remove(manifest_rel)
        with self._lock:
            self._manifests.pop(step, None)
            self._verified.discard(step)
        try:
            files = self._io.find(step_rel)
        except UnsafePathError as exc:
            log.warning("step %d under %s: not deleting its files: %s", step, self.url, exc)
            return
        listed = frozenset(f.path for f in manifest.files) if manifest is not None else frozenset()
        torn = frozenset(rel for rel in files if layout.is_torn_record(rel))
        self._remove_store_files(step_rel, list(files), listed | torn)
        self._io.remove_empty_dirs(step_rel, keep_top=False)

    def gc(self, grace_s: float | None = None) -> list[str]:
        """Delete what no checkpoint references and no live writer can still commit.

        In a committed step: every file its manifest does not list (other writers'
        shards, part records, temp files).  In an uncommitted step: the files of a
        generation older than the newest commit's, of a step older than the newest
        committed step, or untouched for `grace_s` (default `config.gc_grace_s`).
        A step whose manifest is unreadable is left for `prune`/an operator, and a
        save in flight in this store is never touched.  Returns the removed paths.
        """
        grace = self.config.gc_grace_s if grace_s is None else grace_s
        now = time.time()
        scanned = dict(self._scan())
        committed = {s: m for s, m in scanned.items() if isinstance(m, Manifest)}
        newest_step = max(committed, default=None)
        newest_generation = max((m.generation for m in committed.values()), default=None)
        with self._lock:
            busy = set(self._inflight)
        if self._pending is not None and not self._pending.done():
            busy.add(self._pending.step)
        removed: list[str] = []
        for step in self._step_numbers():
            if step in busy or isinstance(scanned.get(step), CorruptCheckpointError):
                continue
            step_rel = layout.step_dir(step)
            try:
                found = self._io.find(step_rel)
            except UnsafePathError as exc:
                log.warning("gc: step %d under %s skipped: %s", step, self.url, exc)
                continue
            # Only what a save wrote is a candidate; anything else is someone's file.
            files = {rel: info for rel, info in found.items() if layout.written_by_store(rel)}
            manifest = committed.get(step)
            if manifest is not None:
                keep = {layout.MANIFEST} | {f.path for f in manifest.files}
                doomed = [rel for rel in files if rel not in keep]
            else:
                doomed = self._abandoned(step, files, now, grace, newest_step, newest_generation)
            removed.extend(self._remove_store_files(step_rel, doomed))
            if manifest is not None or (newest_step is not None and step < newest_step):
                self._io.remove_empty_dirs(step_rel, keep_top=manifest is not None)
        if removed:
            log.info("gc removed %d leftover file(s) under %s", len(removed), self.url)
        return removed

    @staticmethod
    def _abandoned(
        step: int,
        files: dict[str, dict[str, Any]],
        now: float,
        grace_s: float,
        newest_step: int | None,
        newest_generation: int | None,
    ) -> list[str]:
        """The files of an uncommitted step that belong to writers that cannot commit."""
        by_generation: dict[int | None, list[str]] = {}
        for rel in files:
            by_generation.setdefault(layout.parse_generation_dir(rel.split("/", 1)[0]), []).append(
                rel
            )
        doomed: list[str] = []
        for generation, rels in by_generation.items():
            mtimes = [_mtime(files[rel]) for rel in rels]
            newest_mtime = None if None in mtimes else max(m for m in mtimes if m is not None)
            if leftover_is_garbage(
                step=step,
                generation=generation,
                newest_mtime=newest_mtime,
                now=now,
                grace_s=grace_s,
                newest_step=newest_step,
                newest_generation=newest_generation,
            ):
                doomed.extend(rels)
        return doomed
