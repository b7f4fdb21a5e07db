"""Read a committed checkpoint's files, checking each against its manifest entry.

Each file is read once, front to back, into the tensors it holds (no
intermediate buffer), while its checksum is computed; the tensors are handed
out only if every file has the size and checksum the manifest recorded.  The
same pass with no destination tensors is `verify`.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from storage import layout
from storage.checksum import Hasher, algorithm_of
from storage.errors import UnsafePathError
from storage.fsio import StorageIO
from storage.manifest import FileEntry, Manifest, TensorEntry
from storage.serialize import byte_view, dtype_from_name, flat_bytes


@dataclass(frozen=True)
class FileProblem:
    """Why one file of a checkpoint is bad: missing, size, checksum or manifest."""

    step: int
    path: str  # URL of the file
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.path}: {self.reason}: {self.detail}"


class _Short(Exception):
    """The file ended before the manifest said it would."""


def _fill(f: Any, view: memoryview, hasher: Hasher, chunk_bytes: int) -> None:
    """Read exactly len(view) bytes into `view`, hashing them."""
    got = 0
    while got < len(view):
        part = view[got : got + chunk_bytes]
        n = f.readinto(part)
        if not n:
            raise _Short(got)
        hasher.update(part[:n])
        got += n


def allocate(entries: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    return {tid: torch.empty(e.shape, dtype=dtype_from_name(e.dtype)) for tid, e in entries.items()}


def read_files(
    io: StorageIO,
    manifest: Manifest,
    dest: dict[str, torch.Tensor] | None,
    *,
    chunk_bytes: int,
    io_threads: int,
) -> list[FileProblem]:
    """Read every file of `manifest`, filling `dest` (tensor id -> tensor) when given;
    return the problems found (empty when the checkpoint is intact)."""
    step_rel = layout.step_dir(manifest.step)
    placed: dict[str, list[tuple[int, str, int, int]]] = {f.path: [] for f in manifest.files}
    for tid, entry in manifest.tensors.items():
        for loc in entry.locations:
            placed.setdefault(loc.file, []).append((loc.offset, tid, loc.start, loc.nbytes))
    views = {tid: byte_view(flat_bytes(t)) for tid, t in dest.items()} if dest is not None else {}

    def check(entry: FileEntry) -> FileProblem | None:
        rel = layout.join(step_rel, entry.path)
        where = io.display(rel)

        def consume(f: Any) -> FileProblem | None:
            hasher = Hasher(algorithm_of(entry.checksum))
            scratch = memoryview(bytearray(min(chunk_bytes, max(entry.size, 1))))
            pos = 0
            try:
                for offset, tid, start, nbytes in sorted(placed.get(entry.path, ())):
                    while pos < offset:  # bytes no tensor claims still count for the checksum
                        n = min(offset - pos, len(scratch))
                        _fill(f, scratch[:n], hasher, chunk_bytes)
                        pos += n
                    view = views.get(tid)
                    target = view[start : start + nbytes] if view is not None else None
                    if target is None:
                        for sub in range(0, nbytes, len(scratch)):
                            n = min(nbytes - sub, len(scratch))
                            _fill(f, scratch[:n], hasher, chunk_bytes)
                    else:
                        _fill(f, target, hasher, chunk_bytes)
                    pos += nbytes
                while pos < entry.size:
                    n = min(entry.size - pos, len(scratch))
                    _fill(f, scratch[:n], hasher, chunk_bytes)
                    pos += n
            except _Short as short:
                return FileProblem(
                    manifest.step,
                    where,
                    "size",
                    f"truncated: ended after {pos + short.args[0]} of {entry.size} bytes",
                )
            extra = f.read(1)
            if extra:
                return FileProblem(
                    manifest.step, where, "size", f"longer than the recorded {entry.size} bytes"
                )
            actual = hasher.hexdigest()
            if actual != entry.checksum:
                return FileProblem(
                    manifest.step, where, "checksum", f"expected {entry.checksum}, got {actual}"
                )
            return None

        try:
            return io.read_stream(rel, consume)
        except FileNotFoundError:
            return FileProblem(manifest.step, where, "missing", "file does not exist")
        except UnsafePathError as exc:
            return FileProblem(manifest.step, where, "unsafe", str(exc))

    files = list(manifest.files)
    if len(files) > 1 and io_threads > 1:
        with ThreadPoolExecutor(min(io_threads, len(files)), thread_name_prefix="ckpt-io") as pool:
            results: Iterable[FileProblem | None] = list(pool.map(check, files))
    else:
        results = [check(f) for f in files]
    return [p for p in results if p is not None]
