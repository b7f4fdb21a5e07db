"""Helpers of the location-trust tests: forge manifests as an attacker with write
access would (resealed with the store's own digest), and watch every path a store touches."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from storage import manifest as manifest_format
from tests.storage.testlib import Location


def reseal(envelope: dict[str, Any]) -> bytes:
    """The envelope with a digest that matches its (altered) body, as anyone can compute."""
    envelope = dict(envelope)
    envelope["sha256"] = manifest_format._canonical_digest(
        envelope.get("format"), envelope.get("version"), envelope.get("body")
    )
    return json.dumps(envelope).encode()


def forge(loc: Location, step: int, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite step's manifest: `change(body)` edits it in place, then it is resealed."""
    rel = loc.manifest(step)
    envelope = json.loads(loc.read(rel))
    change(envelope["body"])
    loc.write(rel, reseal(envelope))


def point_files_at(body: dict[str, Any], target: str) -> None:
    """Make the first file entry, and every tensor piece in it, name `target`."""
    old = body["files"][0]["path"]
    body["files"][0]["path"] = target
    for tensor in body["tensors"].values():
        for loc in tensor["at"]:
            if loc[0] == old:
                loc[0] = target


def first_data_file(loc: Location, step: int) -> str:
    return loc.data_files(step)[0]  # relative to the root already


class WatchedFileSystem(LocalFileSystem):
    """Local disk that records the resolved path of everything it is asked to touch,
    so a test can assert nothing outside the location was read, written or deleted
    (a symlink followed out shows up as its target)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.touched: list[tuple[str, str]] = []

    def _note(self, op: str, path: Any) -> None:
        for p in path if isinstance(path, (list, tuple)) else [path]:
            self.touched.append((op, os.path.realpath(self._strip_protocol(p))))

    def outside(self, root: str) -> list[tuple[str, str]]:
        """Operations on something outside `root`.  Listing a directory stats each entry,
        following a symlink to its target's metadata (`info`): that reads no content and
        changes nothing, so it is not counted."""
        real = os.path.realpath(root)
        return [
            (op, p)
            for op, p in self.touched
            if op != "info" and p != real and not p.startswith(real + "/")
        ]


def _watch(name: str) -> None:
    original = getattr(LocalFileSystem, name)

    def wrapper(self: WatchedFileSystem, path: Any, *args: Any, **kwargs: Any) -> Any:
        self._note(name, path)
        if name in ("mv", "link", "cp_file", "copy") and args:
            self._note(name, args[0])
        return original(self, path, *args, **kwargs)

    setattr(WatchedFileSystem, name, wrapper)


for _name in (
    "_open",
    "cat_file",
    "ls",
    "info",
    "rm",
    "rm_file",
    "mv",
    "link",
    "makedirs",
    "pipe_file",
    "exists",
    "size",
    "find",
    "cp_file",
):
    _watch(_name)
