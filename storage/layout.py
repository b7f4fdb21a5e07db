"""Where things live under a checkpoint root; the only module that spells paths.

    <root>/step-000000000042/                     one directory per step
        manifest.json                             the commit record, written last
        g000003/                                  everything generation 3 wrote
            part-00001.json                       rank 1's part record (multi-rank only)
            r00001-5e6f7a8b9c0d/data-00000.bin    rank 1's shard files, writer-unique
        .tmp-<hex>-manifest.json                  local-disk temp file before the rename

Paths inside a manifest are relative to its step directory, so a step
directory can be copied elsewhere whole.  Data paths are unique per writer
(generation, rank and a random id), so no two writers ever touch the same file
and a committed file is never rewritten.
"""

from __future__ import annotations

import re
import uuid

MANIFEST = "manifest.json"
TEMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step-(\d+)$")
_GEN_RE = re.compile(r"^g(\d+)$")


def step_dir(step: int) -> str:
    return f"step-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a step directory's base name, or None for anything else."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def generation_dir(generation: int) -> str:
    return f"g{generation:06d}"


def parse_generation_dir(name: str) -> int | None:
    match = _GEN_RE.match(name)
    return int(match.group(1)) if match else None


def new_writer_dir(generation: int, rank: int) -> str:
    """A fresh writer-unique directory, relative to the step directory."""
    return f"{generation_dir(generation)}/r{rank:05d}-{uuid.uuid4().hex[:12]}"


def data_file(writer_dir: str, index: int) -> str:
    return f"{writer_dir}/data-{index:05d}.bin"


def part_record(generation: int, rank: int) -> str:
    """Rank's part record, relative to the step directory."""
    return f"{generation_dir(generation)}/part-{rank:05d}.json"


def temp_name(final_name: str) -> str:
    """A unique sibling name for a temp file that is renamed to `final_name`."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{final_name}"


def join(*parts: str) -> str:
    """Join URL path parts with '/', ignoring empty ones (fsspec paths are posix)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
