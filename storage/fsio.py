"""The storage primitives the store is built from, over any fsspec filesystem.

Each primitive is one retried unit (a whole file is rewritten on a retry) and
translates backend errors into the storage error types with the URL in the
message.  The commit primitive `put(..., create_only=True)` differs by backend:

* local disk: write a temp file, fsync it, hard-link it to the final name
  (atomic and refuses to replace an existing file), remove the temp name,
  fsync the directory;
* object stores and memory: one conditional put (`If-None-Match: *` on S3),
  since there a rename is a copy plus a delete and not atomic.

Every path a primitive touches is `root/rel` with `rel` passing
`layout.check_relative`, so it stays below the root on every backend; on local
disk the resolved path (symlinks followed) must stay below the resolved root
too, and what is read must be a regular file (a FIFO or device would block or
never end).  A symlink swapped in between that check and the open is outside
what this can stop: whoever can do that can also rewrite the files themselves.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

from storage import layout
from storage.errors import (
    InvalidArgumentError,
    InvalidURLError,
    StorageAccessError,
    StorageError,
    UnsafePathError,
)
from storage.retry import RetryPolicy

T = TypeVar("T")


def _protocols(url: str) -> list[str]:
    """The protocols of a (possibly chained, `a::b://x`) URL; a plain path is `file`."""
    parts = url.split("::")
    protocols = [p.split("://", 1)[0] if "://" in p else p for p in parts[:-1]]
    last = parts[-1]
    protocols.append(last.split("://", 1)[0] if "://" in last else "file")
    return protocols


def open_location(
    url: str, storage_options: dict[str, Any] | None, fs: AbstractFileSystem | None
) -> tuple[AbstractFileSystem, str]:
    """Validate `url` and return (filesystem, root path in that filesystem's form)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidURLError(f"checkpoint URL must be a non-empty string, got {url!r}")
    if fs is not None and storage_options:
        raise InvalidArgumentError("pass either fs or storage_options, not both")
    for protocol in _protocols(url):
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError as exc:
            raise InvalidURLError(
                f"unknown URL scheme {protocol!r} in {url!r} (fsspec has no such protocol; "
                "use e.g. file://, memory://, s3://)"
            ) from exc
        except ImportError as exc:
            raise InvalidURLError(
                f"URL scheme {protocol!r} in {url!r} needs a package that is not installed: {exc}"
            ) from exc
    if fs is None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ValueError, TypeError, ImportError) as exc:
            raise InvalidURLError(f"cannot open {url!r}: {exc}") from exc
    else:
        last = url.split("::")[-1]
        cls = fsspec.get_filesystem_class(_protocols(last)[0])
        root = cls._strip_protocol(last)
    if not root:
        raise InvalidURLError(f"checkpoint URL {url!r} names no location (empty path)")
    return fs, root


def process_local(fs: AbstractFileSystem) -> bool:
    """Whether the filesystem's contents live in this process only (memory://): other
    processes, such as the workers of one job, each see an empty one of their own."""
    from fsspec.implementations.memory import MemoryFileSystem

    inner = getattr(fs, "fs", None)  # wrappers (fault injection, caches) delegate to .fs
    return isinstance(fs, MemoryFileSystem) or (
        isinstance(inner, AbstractFileSystem) and process_local(inner)
    )


class StorageIO:
    """Retried, error-translating file operations under one root."""

    def __init__(
        self,
        url: str,
        retry: RetryPolicy,
        *,
        storage_options: dict[str, Any] | None = None,
        fs: AbstractFileSystem | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = open_location(url, storage_options, fs)
        self.retry = retry
        # Local disk gets temp+fsync+rename; everything else is treated as an object store.
        self.local = bool(getattr(self.fs, "local_file", False))

    # -- naming ---------------------------------------------------------------

    def path(self, rel: str) -> str:
        """`root/rel`, or UnsafePathError when that would leave the location."""
        if not rel:
            full = self.root
        else:
            layout.check_relative(rel, f"path under {self.url}:")
            full = layout.join(self.root, rel)
        if self.local:
            root = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if real != root and not real.startswith(root.rstrip("/") + "/"):
                raise UnsafePathError(
                    f"{self.display(rel)} resolves to {real!r}, outside the location "
                    "(a symlink leaving it?); refused"
                )
        return full

    def contains(self, url: str) -> bool:
        """Whether `url` (as a user would pass it) names the location or something in it."""
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except (ValueError, TypeError, ImportError):
            return False
        if self.local and getattr(fs, "local_file", False):
            inner, root = os.path.realpath(path), os.path.realpath(self.root)
        elif type(fs) is type(self.fs):
            inner, root = os.path.normpath("/" + path), os.path.normpath("/" + self.root)
        else:
            return False
        return inner == root or inner.startswith(root.rstrip("/") + "/")

    def confined(self, rel: str) -> bool:
        """Whether `rel` may be touched (see `path`)."""
        try:
            self.path(rel)
        except UnsafePathError:
            return False
        return True

    def _readable(self, rel: str) -> str:
        """The path of `rel` for reading: confined and, on local disk, a regular file."""
        path = self.path(rel)
        if self.local:
            try:
                mode = os.stat(path).st_mode
            except FileNotFoundError:
                raise
            except NotADirectoryError as exc:  # a file where a directory should be
                raise FileNotFoundError(path) from exc
            except OSError as exc:
                raise StorageAccessError(f"read {self.display(rel)}: {exc}") from exc
            if not stat.S_ISREG(mode):
                raise UnsafePathError(f"{self.display(rel)} is not a regular file; refused")
        return path

    def display(self, rel: str = "") -> str:
        """The URL of `rel`, for messages."""
        return f"{self.url}/{rel}" if rel else self.url

    # -- the retried unit -----------------------------------------------------

    def call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run `fn` with retries; FileNotFoundError / FileExistsError pass through for
        callers to interpret, every other failure becomes a StorageError naming the URL."""
        label = f"{what} {self.display(rel)}"
        try:
            return self.retry.call(label, fn)
        except (FileNotFoundError, FileExistsError, StorageError):
            raise
        except PermissionError as exc:
            raise StorageAccessError(
                f"{label}: permission denied (read-only location?): {exc}"
            ) from exc
        except Exception as exc:
            raise StorageAccessError(f"{label}: {type(exc).__name__}: {exc}") from exc

    # -- reads ----------------------------------------------------------------

    def ls(self, rel: str) -> list[dict[str, Any]]:
        """Entries directly under `rel` (name = base name); [] if it does not exist."""
        path = self.path(rel)

        def run() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(path)  # other writers change listings behind our back
            try:
                entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
            return [{**e, "name": layout.basename(e["name"])} for e in entries]

        return self.call("list", rel, run)

    def find(self, rel: str) -> dict[str, dict[str, Any]]:
        """All files below `rel`, keyed by path relative to `rel`."""
        path = self.path(rel)

        def run() -> dict[str, dict[str, Any]]:
            self.fs.invalidate_cache(path)
            try:
                found = self.fs.find(path, detail=True)
            except FileNotFoundError:
                return {}
            prefix = self.fs._strip_protocol(path).rstrip("/") + "/"
            out = {}
            for name, info in found.items():
                name = self.fs._strip_protocol(name)
                out[name[len(prefix) :] if name.startswith(prefix) else name] = info
            return out

        return self.call("list", rel, run)

    def _fresh(self, rel: str, path: str, fn: Callable[[str], T]) -> T:
        """`fn(path)` past any cached listing: other writers change things behind our back."""

        def run() -> T:
            self.fs.invalidate_cache(path)
            return fn(path)

        return self.call("check", rel, run)

    def exists(self, rel: str) -> bool:
        return bool(self._fresh(rel, self.path(rel), self.fs.exists))

    def size(self, rel: str) -> int:
        return int(self._fresh(rel, self._readable(rel), self.fs.size))

    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """The whole of `rel`; with `limit`, UnsafePathError if it is longer (a record
        someone made huge must not exhaust memory)."""
        path = self._readable(rel)
        end = None if limit is None else limit + 1
        data = self.call("read", rel, lambda: self.fs.cat_file(path, start=0, end=end))
        if limit is not None and len(data) > limit:
            raise UnsafePathError(f"{self.display(rel)} is larger than {limit} bytes; refused")
        return data

    def read_stream(self, rel: str, consume: Callable[[Any], T]) -> T:
        """Open `rel` for reading and hand it to `consume`; a retry reopens and starts over."""
        path = self._readable(rel)

        def run() -> T:
            with self.fs.open(path, "rb") as f:
                return consume(f)

        return self.call("read", rel, run)

    # -- writes ---------------------------------------------------------------

    def _writing(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        try:
            return self.call(what, rel, fn)
        except FileNotFoundError as exc:
            # Writes create their parents, so this means the location itself is gone
            # (no such bucket, directory removed under us).
            raise StorageAccessError(
                f"{what} {self.display(rel)}: location does not exist ({exc})"
            ) from exc

    def write_stream(self, rel: str, produce: Callable[[Any], T]) -> T:
        """Create `rel` with the bytes `produce(f)` writes; durable (fsynced) on local disk.
        A retry truncates and starts over, so `produce` must be repeatable."""
        path = self.path(rel)

        def run() -> T:
            if self.local:
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(path, "wb") as f:
                result = produce(f)
                if self.local:
                    f.flush()
                    os.fsync(f.fileno())
            return result

        return self._writing("write", rel, run)

    def put(self, rel: str, data: bytes, *, create_only: bool) -> None:
        """Make `rel` hold exactly `data`, atomically: readers see all of it or nothing.
        With `create_only`, raise FileExistsError if `rel` already exists."""
        if not self.local:
            mode = "create" if create_only else "overwrite"
            path = self.path(rel)
            self._writing("write", rel, lambda: self.fs.pipe_file(path, data, mode=mode))
            return
        parent, _, name = rel.rpartition("/")
        tmp = layout.join(parent, layout.temp_name(name))
        self.write_stream(tmp, lambda f: f.write(data))
        try:
            if create_only and hasattr(self.fs, "link"):
                # link(2) is atomic and fails with EEXIST: the local create-only rename.
                src, dst = self.path(tmp), self.path(rel)
                self._writing("commit", rel, lambda: self.fs.link(src, dst))
            else:
                if create_only and self.exists(rel):
                    raise FileExistsError(self.path(rel))
                src, dst = self.path(tmp), self.path(rel)
                self._writing("rename", rel, lambda: self.fs.mv(src, dst))
        finally:
            self.remove(tmp, missing_ok=True)
        self.fsync_dir(parent)

    def move(self, rel: str, new_rel: str) -> None:
        """Rename `rel` to `new_rel` (atomic on local disk; copy + delete elsewhere);
        FileNotFoundError if `rel` is gone (someone else moved it first)."""
        src, dst = self.path(rel), self.path(new_rel)
        self.call("rename", rel, lambda: self.fs.mv(src, dst))
        self.fs.invalidate_cache(src)

    def remove(self, rel: str, *, recursive: bool = False, missing_ok: bool = True) -> None:
        path = self.path(rel)

        def run() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                if not missing_ok:
                    raise
            self.fs.invalidate_cache(path)

        self.call("delete", rel, run)

    def remove_many(self, rels: list[str]) -> None:
        """Delete files (one batched request where the backend supports it)."""
        if not rels:
            return
        paths = [self.path(rel) for rel in rels]  # all confined before any is deleted

        def run() -> None:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                for path in paths:  # some were gone already: delete the rest one by one
                    if self.fs.exists(path):
                        self.fs.rm(path)
            for path in paths:
                self.fs.invalidate_cache(path)

        self.call("delete", rels[0] if len(rels) == 1 else f"{rels[0]} (+{len(rels) - 1})", run)

    def remove_empty_dirs(self, rel: str, *, keep_top: bool) -> None:
        """Remove empty directories below `rel` (and `rel` itself unless `keep_top`).
        Local disk only: object stores have no directories to leave behind."""
        if not self.local:
            return
        top = self.path(rel)
        for dirpath, _, _ in os.walk(top, topdown=False):
            if (dirpath != top or not keep_top) and not os.listdir(dirpath):
                os.rmdir(dirpath)

    def fsync_dir(self, rel: str) -> None:
        """Make a directory's entries (new files, renames) durable; local disk only."""
        if not self.local:
            return
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
