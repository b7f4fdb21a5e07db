"""The manifest (the commit record of one step) and the part record (one rank's share).

Both are JSON in a sealed envelope:

    {"format": "elastic-ckpt-manifest", "version": 1, "sha256": "<digest of body>", "body": {...}}

The digest covers the canonical form of the body (sorted keys, no spaces), so a
bit flip anywhere in the file is detected even where the JSON still parses.
Written with a key, the envelope also holds `"hmac": "hmac-sha256:<hex>"` over
the same canonical form (see `storage.signing`).  Decoding checks the type and
range of every field (`storage.schema`) and every path (`layout.check_relative`).
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
from storage.errors import (
    BadSignatureError,
    CorruptCheckpointError,
    UnsignedError,
    UnsupportedFormatError,
)
from storage.layout import check_relative
from storage.schema import MAX_DIMS, MAX_NAME_CHARS, MAX_WORLD, Fields
from storage.serialize import check_encoded_tree, dtype_from_name, loadable_dtypes
from storage.signing import sign, signature_matches

VERSION = 1
MANIFEST_FORMAT = "elastic-ckpt-manifest"
PART_FORMAT = "elastic-ckpt-part"
MAX_RECORD_BYTES = 256 * 2**20  # a manifest of a very large model is a few MiB

# How a record's signature was found (Manifest.signature, `verify`'s report).
UNSIGNED = "unsigned"
SIGNED = "signed"
SIGNED_UNCHECKED = "signed (not checked: no key given)"


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
    signature: str = "unsigned"  # how it was read (UNSIGNED, SIGNED, ...); not stored

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _canonical(kind: Any, version: Any, body: Any) -> bytes:
    # Format and version are covered too: a flipped version byte must read as
    # corruption, not as "written by a newer release".
    sealed = {"format": kind, "version": version, "body": body}
    return json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()


def _canonical_digest(kind: Any, version: Any, body: Any) -> str:
    return digest(_canonical(kind, version, body))


def seal(kind: str, body: dict[str, Any], key: bytes | None = None) -> bytes:
    canonical = _canonical(kind, VERSION, body)
    envelope = {"format": kind, "version": VERSION, "sha256": digest(canonical), "body": body}
    if key is not None:
        envelope["hmac"] = sign(key, canonical)
    return (json.dumps(envelope, sort_keys=True, allow_nan=False) + "\n").encode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def unseal(kind: str, data: bytes, where: str, key: bytes | None) -> tuple[dict[str, Any], str]:
    """(body, signature status) of a sealed record; with `key`, only a record signed
    with it is accepted."""
    try:
        envelope = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        if not isinstance(envelope, dict):
            raise TypeError("the envelope is not an object")
        fmt, version, body = envelope["format"], envelope["version"], envelope["body"]
        sealed = envelope["sha256"]
        canonical = _canonical(fmt, version, body)
        intact = digest(canonical) == sealed
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: unreadable {kind} ({exc})") from exc
    if not intact:
        raise CorruptCheckpointError(f"{where}: checksum mismatch (the file is corrupt)")
    if fmt != kind:
        raise CorruptCheckpointError(f"{where}: expected format {kind!r}, found {fmt!r}")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise UnsupportedFormatError(
            f"{where}: format version {version!r} is not supported (this reader knows "
            f"versions 1..{VERSION}); upgrade the runtime to read it"
        )
    if not isinstance(body, dict):
        raise CorruptCheckpointError(f"{where}: malformed {kind} (body is not an object)")
    signature = envelope.get("hmac")
    if signature is None:
        if key is not None:
            raise UnsignedError(f"{where}: {kind} is unsigned, and a key was given; refused")
        return body, UNSIGNED
    if key is None:
        return body, SIGNED_UNCHECKED
    if not signature_matches(key, canonical, signature):
        raise BadSignatureError(
            f"{where}: bad signature (tampered, or signed with another key); refused"
        )
    return body, SIGNED


def _files_to_json(files: tuple[FileEntry, ...]) -> list[dict[str, Any]]:
    return [{"path": f.path, "size": f.size, "checksum": f.checksum} for f in files]


def _files_from_json(data: list[Any], where: str) -> tuple[FileEntry, ...]:
    out = []
    for item in data:
        f = Fields(item, where, "file entry")
        path = check_relative(f.get("path"), f"{where}: file")
        out.append(FileEntry(path, f.int("size"), f.checksum("checksum")))
    if len({e.path for e in out}) != len(out):
        raise CorruptCheckpointError(f"{where}: a file is listed twice")
    return tuple(out)


def _locations_to_json(locs: tuple[Location, ...]) -> list[list[Any]]:
    return [[loc.file, loc.offset, loc.start, loc.nbytes] for loc in locs]


def _locations_from_json(data: Any, where: str) -> tuple[Location, ...]:
    if not isinstance(data, list):
        raise CorruptCheckpointError(f"{where}: tensor locations are not a list")
    out = []
    for item in data:
        if not isinstance(item, list) or len(item) != 4:
            raise CorruptCheckpointError(f"{where}: a tensor location is not [file, o, s, n]")
        path = check_relative(item[0], f"{where}: tensor location file")
        f = Fields(
            dict(zip(("file", "offset", "start", "nbytes"), item, strict=True)),
            where,
            f"tensor location in {path!r}",
        )
        out.append(Location(path, f.int("offset"), f.int("start"), f.int("nbytes")))
    return tuple(out)


def _tensors_to_json(tensors: Mapping[str, TensorEntry]) -> dict[str, Any]:
    return {
        tid: {"dtype": t.dtype, "shape": list(t.shape), "at": _locations_to_json(t.locations)}
        for tid, t in tensors.items()
    }


def _tensors_from_json(data: dict[str, Any], where: str) -> dict[str, TensorEntry]:
    out = {}
    for tid, item in data.items():
        if len(tid) > MAX_NAME_CHARS:
            raise CorruptCheckpointError(f"{where}: a tensor id is too long")
        f = Fields(item, where, f"tensor {tid[:80]!r}")
        dtype = f.str("dtype")
        if dtype not in loadable_dtypes():
            raise f.bad("dtype", dtype, "a dtype the store writes")
        shape = f.list("shape")
        if len(shape) > MAX_DIMS:
            raise f.bad("shape", shape, f"at most {MAX_DIMS} dimensions")
        dims = f.ints("shape", shape)
        out[tid] = TensorEntry(dtype, dims, _locations_from_json(f.get("at"), where))
    return out


def encode_manifest(m: Manifest, key: bytes | None = None) -> bytes:
    return seal(
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
        key,
    )


def decode_manifest(data: bytes, where: str, key: bytes | None = None) -> Manifest:
    """The manifest in `data`, every field checked; CorruptCheckpointError otherwise
    (its SignatureError subclasses when `key` is given and the signature is not good)."""
    body, signature = unseal(MANIFEST_FORMAT, data, where, key)
    f = Fields(body, where, "manifest")
    world_size = f.int("world_size", 1, MAX_WORLD)
    per_rank: dict[int, Any] = {}
    for rank, tree in f.object("per_rank").items():
        if not rank.isdigit() or len(rank) > 7 or int(rank) >= world_size:
            raise f.bad("per_rank", rank, f"rank numbers below the world size {world_size}")
        per_rank[int(rank)] = tree
    metadata = f.object("metadata")
    manifest = Manifest(
        step=f.int("step"),
        generation=f.int("generation"),
        world_size=world_size,
        plan_id=f.str("plan_id"),
        commit_id=f.str("commit_id"),
        created=f.number("created"),
        files=_files_from_json(f.list("files"), where),
        tensors=_tensors_from_json(f.object("tensors"), where),
        state=f.get("state"),
        per_rank=per_rank,
        metadata=metadata,
        signature=signature,
    )
    _check_consistent(manifest, where)
    return manifest


def _check_consistent(m: Manifest, where: str) -> None:
    """Every tensor's pieces lie in listed files, cover it exactly once and share no
    byte with another piece, and the state trees refer only to listed tensors: a load
    can then never hand out uninitialised memory or allocate more than the files
    hold, whatever the manifest says."""
    sizes = {f.path: f.size for f in m.files}
    used: dict[str, list[tuple[int, int]]] = {}
    for tid, entry in m.tensors.items():
        expected = math.prod(entry.shape) * dtype_from_name(entry.dtype).itemsize
        covered = 0
        for loc in sorted(entry.locations, key=lambda loc: loc.start):
            size = sizes.get(loc.file)
            if size is None or loc.offset + loc.nbytes > size:
                raise CorruptCheckpointError(
                    f"{where}: tensor {tid[:80]} points outside the checkpoint's files ({loc.file})"
                )
            if loc.start != covered:
                break
            covered += loc.nbytes
            used.setdefault(loc.file, []).append((loc.offset, loc.offset + loc.nbytes))
        if covered != expected:
            raise CorruptCheckpointError(
                f"{where}: the pieces of tensor {tid[:80]} do not cover its {expected} bytes"
            )
    for path, spans in used.items():
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
            raise CorruptCheckpointError(f"{where}: two tensor pieces overlap in {path}")
    try:
        check_encoded_tree(m.state, m.tensors)
        for tree in m.per_rank.values():
            check_encoded_tree(tree, m.tensors)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: malformed state ({exc})") from exc


def encode_part(p: PartRecord, key: bytes | None = None) -> bytes:
    return seal(
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
        key,
    )


def decode_part(data: bytes, where: str, key: bytes | None = None) -> PartRecord:
    body, _ = unseal(PART_FORMAT, data, where, key)
    f = Fields(body, where, "part record")
    world_size = f.int("world_size", 1, MAX_WORLD)
    locations = {}
    for tid, locs in f.object("locations").items():
        locations[tid] = _locations_from_json(locs, where)
    return PartRecord(
        step=f.int("step"),
        generation=f.int("generation"),
        rank=f.int("rank", 0, world_size - 1),
        world_size=world_size,
        plan_id=f.str("plan_id"),
        writer=check_relative(f.get("writer"), f"{where}: writer directory"),
        files=_files_from_json(f.list("files"), where),
        locations=locations,
        per_rank_state=f.get("per_rank_state"),
        per_rank_tensors=_tensors_from_json(f.object("per_rank_tensors"), where),
    )
