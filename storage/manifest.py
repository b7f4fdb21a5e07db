"""The manifest (the commit record of one step) and the part record (one rank's share).

Both are JSON in a sealed envelope:

    {"format": "elastic-ckpt-manifest", "version": 1, "sha256": "<digest of body>", "body": {...}}

The digest covers the canonical form of the body (sorted keys, no spaces), so a
bit flip anywhere in the file is detected even where the JSON still parses.
A manifest lists every file of the checkpoint with its size and checksum, an
index saying where each tensor's bytes are, the encoded state trees, and the
step, generation, world size and user metadata.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.checksum import digest
from storage.errors import CorruptCheckpointError, UnsupportedFormatError
from storage.serialize import dtype_from_name

VERSION = 1
MANIFEST_FORMAT = "elastic-ckpt-manifest"
PART_FORMAT = "elastic-ckpt-part"


@dataclass(frozen=True)
class FileEntry:
    """One data file, path relative to the step directory."""

    path: str
    size: int
    checksum: str


@dataclass(frozen=True)
class Location:
    """Bytes [start, start + nbytes) of a tensor stored at `offset` in `file`."""

    file: str
    offset: int
    start: int
    nbytes: int


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    locations: tuple[Location, ...] = ()

    @property
    def stored_bytes(self) -> int:
        return sum(loc.nbytes for loc in self.locations)


@dataclass(frozen=True)
class PartRecord:
    """What one rank wrote for a step: its files, where its replicated pieces are,
    and its own per-rank state.  Written once its files are durable."""

    step: int
    generation: int
    rank: int
    world_size: int
    plan_id: str
    writer: str
    files: tuple[FileEntry, ...]
    locations: Mapping[str, tuple[Location, ...]]  # replicated tensor id -> this rank's pieces
    per_rank_state: Any  # encoded tree
    per_rank_tensors: Mapping[str, TensorEntry]


@dataclass(frozen=True)
class Manifest:
    step: int
    generation: int
    world_size: int
    plan_id: str
    commit_id: str
    files: tuple[FileEntry, ...]
    tensors: Mapping[str, TensorEntry]
    state: Any  # encoded replicated tree
    per_rank: Mapping[int, Any]  # rank -> encoded per-rank tree
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _canonical_digest(kind: Any, version: Any, body: Any) -> str:
    # The digest covers format and version too: a flipped version byte must read as
    # corruption, not as "written by a newer release".
    sealed = {"format": kind, "version": version, "body": body}
    return digest(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode())


def _seal(kind: str, body: dict[str, Any]) -> bytes:
    envelope = {
        "format": kind,
        "version": VERSION,
        "sha256": _canonical_digest(kind, VERSION, body),
        "body": body,
    }
    return (json.dumps(envelope, sort_keys=True, allow_nan=False) + "\n").encode()


def _unseal(kind: str, data: bytes, where: str) -> dict[str, Any]:
    try:
        envelope = json.loads(data.decode("utf-8"))
        fmt, version, body = envelope["format"], envelope["version"], envelope["body"]
        sealed = envelope["sha256"]
        intact = _canonical_digest(fmt, version, body) == sealed
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{where}: unreadable {kind} ({exc})") from exc
    if not intact:
        raise CorruptCheckpointError(f"{where}: checksum mismatch (the file is corrupt)")
    if fmt != kind:
        raise CorruptCheckpointError(f"{where}: expected format {kind!r}, found {fmt!r}")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise UnsupportedFormatError(
            f"{where}: format version {version!r} is not supported (this reader knows "
            f"versions 1..{VERSION}); upgrade the runtime to read it"
        )
    if not isinstance(body, dict):
        raise CorruptCheckpointError(f"{where}: malformed {kind} (body is not an object)")
    return body


def _files_to_json(files: tuple[FileEntry, ...]) -> list[dict[str, Any]]:
    return [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in files]


def _files_from_json(data: list[dict[str, Any]]) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(d["path"], int(d["size"]), d["checksum"]) for d in data)


def _locations_to_json(locs: tuple[Location, ...]) -> list[list[Any]]:
    return [[loc.file, loc.offset, loc.start, loc.nbytes] for loc in locs]


def _locations_from_json(data: list[list[Any]]) -> tuple[Location, ...]:
    return tuple(Location(f, int(o), int(s), int(n)) for f, o, s, n in data)


def _tensors_to_json(tensors: Mapping[str, TensorEntry]) -> dict[str, Any]:
    return {
        tid: {"dtype": t.dtype, "shape": list(t.shape), "at": _locations_to_json(t.locations)}
        for tid, t in tensors.items()
    }


def _tensors_from_json(data: dict[str, Any]) -> dict[str, TensorEntry]:
    return {
        tid: TensorEntry(
            t["dtype"], tuple(int(s) for s in t["shape"]), _locations_from_json(t["at"])
        )
        for tid, t in data.items()
    }


def encode_manifest(m: Manifest) -> bytes:
    return _seal(
        MANIFEST_FORMAT,
        {
            "step": m.step,
            "generation": m.generation,
            "world_size": m.world_size,
            "plan_id": m.plan_id,
            "commit_id": m.commit_id,
            "created": m.created,
            "files": _files_to_json(m.files),
            "tensors": _tensors_to_json(m.tensors),
            "state": m.state,
            "per_rank": {str(rank): tree for rank, tree in m.per_rank.items()},
            "metadata": dict(m.metadata),
        },
    )


def decode_manifest(data: bytes, where: str) -> Manifest:
    body = _unseal(MANIFEST_FORMAT, data, where)
    try:
        manifest = Manifest(
            step=int(body["step"]),
            generation=int(body["generation"]),
            world_size=int(body["world_size"]),
            plan_id=body["plan_id"],
            commit_id=body["commit_id"],
            created=float(body["created"]),
            files=_files_from_json(body["files"]),
            tensors=_tensors_from_json(body["tensors"]),
            state=body["state"],
            per_rank={int(rank): tree for rank, tree in body["per_rank"].items()},
            metadata=body["metadata"],
        )
        _check_consistent(manifest, where)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed manifest ({exc!r})") from exc
    return manifest


def _check_consistent(m: Manifest, where: str) -> None:
    """Every tensor's pieces lie in listed files and cover it exactly once, so that a
    load can never hand out uninitialised memory, whatever the manifest says."""
    sizes = {f.path: f.size for f in m.files}
    for tid, entry in m.tensors.items():
        expected = math.prod(entry.shape) * dtype_from_name(entry.dtype).itemsize
        covered = 0
        for loc in sorted(entry.locations, key=lambda loc: loc.start):
            size = sizes.get(loc.file)
            if size is None or loc.offset < 0 or loc.offset + loc.nbytes > size:
                raise CorruptCheckpointError(
                    f"{where}: tensor {tid} points outside the checkpoint's files ({loc.file})"
                )
            if loc.start != covered:
                break
            covered += loc.nbytes
        if covered != expected:
            raise CorruptCheckpointError(
                f"{where}: the pieces of tensor {tid} do not cover its {expected} bytes"
            )


def encode_part(p: PartRecord) -> bytes:
    return _seal(
        PART_FORMAT,
        {
            "step": p.step,
            "generation": p.generation,
            "rank": p.rank,
            "world_size": p.world_size,
            "plan_id": p.plan_id,
            "writer": p.writer,
            "files": _files_to_json(p.files),
            "locations": {tid: _locations_to_json(locs) for tid, locs in p.locations.items()},
            "per_rank_state": p.per_rank_state,
            "per_rank_tensors": _tensors_to_json(p.per_rank_tensors),
        },
    )


def decode_part(data: bytes, where: str) -> PartRecord:
    body = _unseal(PART_FORMAT, data, where)
    try:
        return PartRecord(
            step=int(body["step"]),
            generation=int(body["generation"]),
            rank=int(body["rank"]),
            world_size=int(body["world_size"]),
            plan_id=body["plan_id"],
            writer=body["writer"],
            files=_files_from_json(body["files"]),
            locations={t: _locations_from_json(locs) for t, locs in body["locations"].items()},
            per_rank_state=body["per_rank_state"],
            per_rank_tensors=_tensors_from_json(body["per_rank_tensors"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed part record ({exc!r})") from exc
