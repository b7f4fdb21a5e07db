"""Where things live under a checkpoint root; the only module that spells paths.

    <root>/step-000000000042/                     one directory per step
        manifest.json                             the commit record, written last
        g000003/                                  everything generation 3 wrote
            part-00001.json                       rank 1's part record (multi-rank only)
            r00001-5e6f7a8b9c0d/data-00000.bin    rank 1's shard files, writer-unique
        .tmp-<hex>-manifest.json                  local-disk temp file before the rename
        .torn-<hex>-manifest.json                 an unreadable manifest moved aside
    <root>/CLAIM.json                             which launch of which job owns the root
    <root>/.probe-<hex>                           written and deleted by `probe`

Paths inside a manifest are relative to its step directory, so a step
directory can be copied elsewhere whole.  Data paths are unique per writer
(generation, rank and a random id), so no two writers ever touch the same file
and a committed file is never rewritten.

Others may write to the location, so a path read from a manifest, a part record
or a listing is untrusted: `check_relative` is the one rule that decides
whether such a path stays below the directory it is relative to, and
`written_by_store` the one that decides which files retention may delete.
"""

from __future__ import annotations

import re
import uuid

from storage.errors import UnsafePathError

MANIFEST = "manifest.json"
CLAIM = "CLAIM.json"
TEMP_PREFIX = ".tmp-"
TORN_PREFIX = ".torn-"
PROBE_PREFIX = ".probe-"
MAX_PATH_CHARS = 1024  # S3 keys are at most 1024 bytes; no store path comes close
MAX_SEGMENT_CHARS = 255  # the longest file name local file systems accept
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


def torn_name(final_name: str) -> str:
    """Where an unreadable manifest is moved aside to (kept for an operator to inspect)."""
    return f"{TORN_PREFIX}{uuid.uuid4().hex[:12]}-{final_name}"


def probe_name() -> str:
    return f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"


_HEX = "[0-9a-f]{12}"
_GEN = r"g\d{6,}"
# Everything a save writes below a step directory; nothing else is ever deleted there.
_STORE_FILE_RE = re.compile(
    rf"(?:{re.escape(MANIFEST)}"
    rf"|{re.escape(TEMP_PREFIX)}{_HEX}-{re.escape(MANIFEST)}"
    rf"|{_GEN}/part-\d{{5,}}\.json"
    rf"|{_GEN}/{re.escape(TEMP_PREFIX)}{_HEX}-part-\d{{5,}}\.json"
    rf"|{_GEN}/r\d{{5,}}-[0-9a-f]{{1,32}}/data-\d{{5,}}\.bin)"
)
_TORN_RE = re.compile(rf"{re.escape(TORN_PREFIX)}{_HEX}-{re.escape(MANIFEST)}")


def written_by_store(rel: str) -> bool:
    """Whether `rel` (relative to a step directory) is named as only a save names files.
    Quarantined manifests are not: they stay for an operator, like foreign files."""
    return bool(_STORE_FILE_RE.fullmatch(rel))


def is_torn_record(rel: str) -> bool:
    return bool(_TORN_RE.fullmatch(rel))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_relative(path: object, what: str = "path") -> str:
    """`path` if it is a safe relative path, else UnsafePathError naming it.

    Safe means: a non-empty str of '/'-separated segments, none of them empty,
    '.' or '..', no leading '/', no backslash (a separator on some backends),
    no control character (NUL ends a C string), within length limits.  Joined
    to a directory it therefore names something below that directory on every
    fsspec backend, whatever the backend does with '..' or '//'.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{what} {path!r} is not a non-empty relative path")
    problem = None
    if len(path) > MAX_PATH_CHARS:
        problem = f"longer than {MAX_PATH_CHARS} characters"
    elif path.startswith("/"):
        problem = "absolute"
    elif "\\" in path:
        problem = "contains a backslash"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        problem = "contains a control character"
    elif not path.isascii() and not _encodable(path):
        problem = "is not valid unicode (a lone surrogate)"
    elif "://" in path or path.startswith("~"):
        problem = "looks like a URL or a home directory"
    else:
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                problem = f"has a {segment!r} segment" if segment else "has an empty segment"
                break
            if len(segment) > MAX_SEGMENT_CHARS:
                problem = f"has a segment longer than {MAX_SEGMENT_CHARS} characters"
                break
    if problem:
        shown = path if len(path) <= 200 else path[:200] + "..."
        raise UnsafePathError(f"{what} {shown!r} is unsafe ({problem}); refused")
    return path


def join(*parts: str) -> str:
    """Join URL path parts with '/', ignoring empty ones (fsspec paths are posix)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
