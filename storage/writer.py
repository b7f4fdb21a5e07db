"""One rank's share of a save: turn the state into pieces, then write them to shard files.

`prepare` runs on the caller's thread: it validates the state, encodes the
non-tensor parts as JSON, works out which bytes this rank writes (see
`partition`) and, for an asynchronous save, copies exactly those bytes to CPU,
so the caller may change its tensors as soon as `prepare` returns and the extra
memory is this rank's share of the state.  `write_part` then writes the shard
files (checksummed while writing, fsynced on local disk) under a fresh
writer-unique directory and returns the part record that describes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from storage import layout
from storage.checksum import Hasher, digest
from storage.errors import InvalidArgumentError
from storage.fsio import StorageIO
from storage.manifest import FileEntry, Location, PartRecord, TensorEntry
from storage.partition import Piece, partition, split_into_files
from storage.serialize import (
    byte_view,
    device_bytes,
    dtype_from_name,
    dtype_name,
    encode_tree,
)
from storage.staging import StagingBuffer


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_from_name(self.dtype).itemsize


@dataclass
class PreparedSave:
    """Everything a save needs after the caller's thread has returned."""

    step: int
    generation: int
    rank: int
    world_size: int
    metadata: dict[str, Any]
    plan_id: str
    state: Any  # encoded replicated tree
    specs: dict[str, TensorSpec]  # replicated tensor id -> spec
    per_rank_state: Any  # encoded tree of this rank's own state
    per_rank_specs: dict[str, TensorSpec]
    # tensor id -> (byte offset of `data` within the tensor, 1-D uint8 CPU tensor)
    sources: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    pieces: list[Piece] = field(default_factory=list)  # in file order

    @property
    def held_bytes(self) -> int:
        """Bytes of tensor data this save holds (its snapshot size when copied)."""
        return sum(data.numel() for _, data in self.sources.values())

    def release(self) -> None:
        """Drop the tensor data once it is durable: an async snapshot is freed before
        the commit (which may wait for other ranks), not whenever the thread lets go."""
        self.sources.clear()
        self.pieces.clear()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a dict, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(f"metadata key {key!r} must be a str")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"metadata[{key!r}] is not plain JSON (finite numbers, str, bool, None, "
                f"lists, dicts): {exc}"
            ) from exc
    return json.loads(json.dumps(dict(metadata)))  # a private copy


def _check_state(name: str, state: Any) -> None:
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(f"{name} must be a dict, got {type(state).__name__}")
    for key in state:
        if not isinstance(key, str):
            raise InvalidArgumentError(f"top-level keys of {name} must be str, got {key!r}")


def tensor_id(path: tuple[Any, ...], rank: int | None = None) -> str:
    """Deterministic id of a tensor from its key path (and owning rank for per-rank state)."""
    key = json.dumps(list(path), separators=(",", ":"))
    return key if rank is None else f"r{rank}:{key}"


def _spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(dtype_name(t.dtype), tuple(t.shape))


def _take(t: torch.Tensor, start: int, nbytes: int) -> torch.Tensor:
    """This rank's byte range of `t` as CPU bytes, sliced on the device first so a GPU
    tensor moves only the bytes this rank writes.  Not a copy for a CPU tensor."""
    data = device_bytes(t)[start : start + nbytes]
    return data if data.device.type == "cpu" else data.cpu()


def _snapshot(
    ranges: list[tuple[str, torch.Tensor, int, int]], staging: StagingBuffer | None
) -> dict[str, tuple[int, torch.Tensor]]:
    """Copy every (id, tensor, start, nbytes) range into one CPU buffer (the kept staging
    buffer when given) so the caller may change its tensors once this returns."""
    total = sum(n for _, _, _, n in ranges)
    on_gpu = any(t.device.type == "cuda" for _, t, _, _ in ranges)
    pin = on_gpu and torch.cuda.is_available()
    if staging is not None:
        buf = staging.take(total, pin=pin)
    else:
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    out: dict[str, tuple[int, torch.Tensor]] = {}
    offset = 0
    for tid, t, start, nbytes in ranges:
        dst = buf[offset : offset + nbytes]
        dst.copy_(device_bytes(t)[start : start + nbytes], non_blocking=pin)
        out[tid] = (start, dst)
        offset += nbytes
    if pin:
        torch.cuda.synchronize()  # non_blocking copies must land before the caller goes on
    return out


def prepare(
    step: int,
    state: Mapping[str, Any],
    *,
    generation: int,
    rank: int,
    world_size: int,
    per_rank_state: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    copy: bool,
    staging: StagingBuffer | None = None,
) -> PreparedSave:
    """Validate and plan one rank's share of a save.  With `copy`, snapshot that share
    into CPU memory (into `staging` when given) so the caller's tensors are free."""
    _check_int("step", step, 0)
    _check_int("generation", generation, 0)
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise InvalidArgumentError(f"rank {rank} is out of range for world_size {world_size}")
    _check_state("state", state)
    if per_rank_state is not None:
        _check_state("per_rank_state", per_rank_state)

    tensors: dict[str, torch.Tensor] = {}

    def add(path: tuple[Any, ...], t: torch.Tensor) -> str:
        tid = tensor_id(path)
        tensors[tid] = t
        return tid

    encoded = encode_tree(state, add)
    specs = {tid: _spec(t) for tid, t in sorted(tensors.items())}
    plan_id = digest(
        json.dumps(
            [world_size, [[tid, s.dtype, list(s.shape)] for tid, s in specs.items()]],
            separators=(",", ":"),
        ).encode()
    )
    sizes = [(tid, tensors[tid].numel() * tensors[tid].element_size()) for tid in specs]
    mine = partition(sizes, world_size)[rank]
    ranges = [(p.tensor, tensors[p.tensor], p.start, p.nbytes) for p in mine]
    pieces = list(mine)

    own: dict[str, torch.Tensor] = {}

    def add_own(path: tuple[Any, ...], t: torch.Tensor) -> str:
        tid = tensor_id(path, rank)
        own[tid] = t
        return tid

    encoded_own = encode_tree(per_rank_state or {}, add_own)
    per_rank_specs = {tid: _spec(t) for tid, t in own.items()}
    for tid, t in own.items():
        nbytes = t.numel() * t.element_size()
        ranges.append((tid, t, 0, nbytes))
        if nbytes:
            pieces.append(Piece(tid, 0, nbytes))
    if copy:
        sources = _snapshot(ranges, staging)
    else:
        sources = {tid: (start, _take(t, start, n)) for tid, t, start, n in ranges}

    return PreparedSave(
        step=step,
        generation=generation,
        rank=rank,
        world_size=world_size,
        metadata=_check_metadata(metadata),
        plan_id=plan_id,
        state=encoded,
        specs=specs,
        per_rank_state=encoded_own,
        per_rank_specs=per_rank_specs,
        sources=sources,
        pieces=pieces,
    )


def _write_file(
    io: StorageIO,
    step_rel: str,
    rel: str,
    pieces: list[Piece],
    sources: dict[str, tuple[int, torch.Tensor]],
    algorithm: str,
    chunk_bytes: int,
) -> tuple[FileEntry, list[tuple[str, Location]]]:
    def produce(f: Any) -> tuple[FileEntry, list[tuple[str, Location]]]:
        hasher = Hasher(algorithm)
        offset = 0
        located = []
        for piece in pieces:
            base, data = sources[piece.tensor]
            view = byte_view(data)[piece.start - base : piece.start - base + piece.nbytes]
            for pos in range(0, piece.nbytes, chunk_bytes):
                chunk = view[pos : pos + chunk_bytes]
                f.write(chunk)
                hasher.update(chunk)
            located.append((piece.tensor, Location(rel, offset, piece.start, piece.nbytes)))
            offset += piece.nbytes
        return FileEntry(rel, offset, hasher.hexdigest()), located

    return io.write_stream(layout.join(step_rel, rel), produce)


def write_part(
    io: StorageIO,
    prepared: PreparedSave,
    *,
    algorithm: str,
    max_file_bytes: int,
    chunk_bytes: int,
    io_threads: int,
) -> PartRecord:
    """Write this rank's shard files; when it returns they are durable."""
    step_rel = layout.step_dir(prepared.step)
    writer = layout.new_writer_dir(prepared.generation, prepared.rank)
    groups = split_into_files(prepared.pieces, max_file_bytes)
    jobs = [(layout.data_file(writer, i), group) for i, group in enumerate(groups)]

    def one(job: tuple[str, list[Piece]]) -> tuple[FileEntry, list[tuple[str, Location]]]:
        rel, group = job
        return _write_file(io, step_rel, rel, group, prepared.sources, algorithm, chunk_bytes)

    if len(jobs) > 1 and io_threads > 1:
        with ThreadPoolExecutor(min(io_threads, len(jobs)), thread_name_prefix="ckpt-io") as pool:
            results = list(pool.map(one, jobs))
    else:
        results = [one(job) for job in jobs]
    if jobs and io.local:
        # New directory entries must be durable before anything refers to them.
        gen_rel = f"{step_rel}/{layout.generation_dir(prepared.generation)}"
        for rel in (f"{step_rel}/{writer}", gen_rel, step_rel, ""):
            io.fsync_dir(rel)

    locations: dict[str, list[Location]] = {}
    for _, located in results:
        for tid, loc in located:
            locations.setdefault(tid, []).append(loc)
    per_rank_tensors = {
        tid: TensorEntry(spec.dtype, spec.shape, tuple(locations.pop(tid, ())))
        for tid, spec in prepared.per_rank_specs.items()
    }
    return PartRecord(
        step=prepared.step,
        generation=prepared.generation,
        rank=prepared.rank,
        world_size=prepared.world_size,
        plan_id=prepared.plan_id,
        writer=writer,
        files=tuple(entry for entry, _ in results),
        locations={tid: tuple(locs) for tid, locs in locations.items()},
        per_rank_state=prepared.per_rank_state,
        per_rank_tensors=per_rank_tensors,
    )
