"""Seeded fuzzing of real manifests: whatever someone with write access to the location
puts there, the store reads, writes and deletes nothing outside it, never hangs, raises
only StorageError subclasses with a message, and either detects the change or loads
exactly the original state.

Without a key the digest can be recomputed by anyone, so a resealed edit of a
*value* (a plain number in the state, a shape with the same element count, the
metadata) is a different well-formed checkpoint: for those only the safety
properties are asserted, and the same edits under a key must all be detected.
The fast suite runs FAST_CASES cases per mode, `-m slow` SLOW_CASES.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from storage import CheckpointStore, StorageError, StoreConfig, cli, layout
from storage.errors import SignatureError
from tests.storage.testlib import FAST_RETRY, assert_same
from tests.storage.trustlib import WatchedFileSystem, reseal

FAST_CASES = 250
SLOW_CASES = 3000
CASE_TIMEOUT_S = 60.0  # a hang, not slowness: one case does a few dozen small reads
KEY = b"fuzz-key-0123456789abcdef"
CONFIG = StoreConfig(max_file_bytes=200)  # several files per step: more to point at

EVIL: list[Any] = [
    -1,
    0,
    1,
    7,
    2**31,
    2**63,
    10**100,
    -(2**70),
    1.5,
    -0.0,
    1e308,
    "",
    "x",
    "float64",
    "../../sentinel/secret.bin",
    "/etc/passwd",
    "a\\b",
    "a\x00b",
    "ü/ß.bin",
    "\ud800",
    "a//b",
    ".",
    "g000000/../../..",
    "x" * 5000,
    None,
    True,
    False,
    [],
    {},
    [1, 2, 3],
    {"a": 1},
    {"t": "nope"},
    {"d": [[1]]},
    [[0, 0, 0, 0]],
]
DTYPES = ["float64", "float16", "int8", "bool", "qint8", "bogus", "", "complex128", "uint1"]
SAFETY_ONLY_TOP = {"state", "per_rank", "metadata", "created", "commit_id", "plan_id"}


def state(i: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(i)
    return {
        "model": {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)},
        "optim": {"state": {0: {"m": torch.randn(30, generator=gen)}}, "lr": 0.1 * i},
        "ids": torch.arange(12, dtype=torch.int64),
        "step": i,
    }


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real location written by the store: steps 10 and 20, unsigned and signed."""
    base = tmp_path_factory.mktemp("golden")
    for mode, key in (("plain", None), ("keyed", KEY)):
        store = CheckpointStore(f"file://{base}/{mode}", config=CONFIG, key=key)
        store.save(10, state(10))
        store.save(20, state(20), metadata={"loss": 0.5})
    return base


def _containers(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, container) for every dict and list in a JSON tree."""
    out: list[tuple[tuple, Any]] = []
    if isinstance(node, (dict, list)):
        out.append((path, node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            out.extend(_containers(v, (*path, k)))
    return out


def _pick_slot(rng: random.Random, body: dict) -> tuple[tuple, Any, Any]:
    """A random (path, container, key) of the body with at least one item."""
    slots = [(p, c) for p, c in _containers(body) if c]
    path, container = rng.choice(slots)
    key = rng.choice(list(container) if isinstance(container, dict) else range(len(container)))
    return path, container, key


class Case:
    """One mutated copy of the golden location, with a sentinel directory beside it."""

    def __init__(self, golden: Path, work: Path, mode: str, rng: random.Random) -> None:
        self.dir = work
        shutil.rmtree(work, ignore_errors=True)
        self.root = work / "ckpt"
        shutil.copytree(golden / mode, self.root, symlinks=True)
        self.sentinel = work / "sentinel"
        self.sentinel.mkdir()
        self.step_dir = self.root / layout.step_dir(20)
        self.data = sorted(p for p in self.step_dir.rglob("*.bin"))
        # Same bytes as real files: only confinement can tell a read through a link.
        shutil.copy(self.data[0], self.sentinel / "secret.bin")
        shutil.copy(self.step_dir / layout.MANIFEST, self.sentinel / "manifest.json")
        (self.sentinel / "marker").write_bytes(b"SENTINEL")
        self.rng = rng
        self.kinds: list[str] = []
        self.value_only = True

    def snapshot_sentinel(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.sentinel)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.sentinel.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    # -- mutations ---------------------------------------------------------------

    def _manifest(self) -> Path | None:
        """The manifest file, None if an earlier mutation made it a link or a FIFO
        (writing to a FIFO would block the fuzzer itself)."""
        manifest = self.step_dir / layout.MANIFEST
        return None if manifest.is_symlink() or not manifest.is_file() else manifest

    def _edit(self, change: Callable[[dict], str | None]) -> None:
        manifest = self._manifest()
        if manifest is None:
            return
        try:
            envelope = json.loads(manifest.read_bytes())
            body = copy.deepcopy(envelope["body"])
        except (ValueError, KeyError, TypeError, RecursionError):
            return  # truncated, flipped or replaced by an earlier mutation
        try:
            top = change(body)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError):
            return  # an earlier mutation removed what this one edits
        envelope["body"] = body
        manifest.write_bytes(reseal(envelope))
        if top not in SAFETY_ONLY_TOP:
            self.value_only = False

    def mutate(self) -> None:
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            kind = self.rng.choice(MUTATIONS)
            self.kinds.append(kind.__name__)
            kind(self)

    def m_leaf(self) -> None:
        def change(body: dict) -> str:
            path, container, key = _pick_slot(self.rng, body)
            container[key] = copy.deepcopy(self.rng.choice(EVIL))
            return str(path[0] if path else key)

        self._edit(change)

    def m_delete_key(self) -> None:
        def change(body: dict) -> str | None:
            dicts = [(p, c) for p, c in _containers(body) if isinstance(c, dict) and c]
            path, container = self.rng.choice(dicts)
            key = self.rng.choice(list(container))
            del container[key]
            # Dropping a metadata entry or a state dict item is a value edit.
            return str(path[0]) if path else key

        self._edit(change)

    def m_extra_key(self) -> None:
        def change(body: dict) -> str | None:
            dicts = [(p, c) for p, c in _containers(body) if isinstance(c, dict)]
            path, container = self.rng.choice(dicts)
            container[self.rng.choice(["extra", "ü", "\ud800", "t", "d"])] = self.rng.choice(EVIL)
            return str(path[0]) if path else "extra"

        self._edit(change)

    def m_path(self) -> None:
        link = self.step_dir / "link.bin"
        if not link.exists():
            link.symlink_to(self.sentinel / "secret.bin")
        target = self.rng.choice(
            [
                "../../sentinel/secret.bin",
                str(self.sentinel / "secret.bin"),
                "g000000/../../../sentinel/secret.bin",
                "link.bin",
                "..\\..\\sentinel\\secret.bin",
                "g000000/\x00/x",
                "",
                "/",
                ".",
                "a//b",
                "ü.bin",
                "\ud800",
                "~/x",
                "file:///etc",
            ]
        )

        def change(body: dict) -> str:
            entry = self.rng.choice(body["files"])
            old, entry["path"] = entry["path"], target
            for tensor in body["tensors"].values():
                for loc in tensor["at"]:
                    if loc[0] == old:
                        loc[0] = target
            return "files"

        self._edit(change)

    def m_number(self) -> None:
        def change(body: dict) -> str:
            field = self.rng.choice(
                ["size", "offset", "start", "nbytes", "step", "generation", "world_size", "shape"]
            )
            value = self.rng.choice([-1, 0, 1, 2**62, 2**63, 10**100, 3, 4096])
            if field in ("step", "generation", "world_size"):
                body[field] = value
                return field
            if field == "size":
                self.rng.choice(body["files"])["size"] = value
                return "files"
            tensor = self.rng.choice([t for t in body["tensors"].values() if t["at"]])
            if field == "shape":
                tensor["shape"] = [value] * self.rng.choice((1, 2))
            else:
                loc = self.rng.choice(tensor["at"])
                loc[["offset", "start", "nbytes"].index(field) + 1] = value
            return "tensors"

        self._edit(change)

    def m_dtype(self) -> None:
        def change(body: dict) -> str:
            self.rng.choice(list(body["tensors"].values()))["dtype"] = self.rng.choice(DTYPES)
            return "tensors"

        self._edit(change)

    def m_overlap(self) -> None:
        def change(body: dict) -> str:
            pieces = [loc for t in body["tensors"].values() for loc in t["at"]]
            a, b = self.rng.sample(pieces, 2)
            b[0], b[1] = a[0], a[1]
            return "tensors"

        self._edit(change)

    def m_duplicate_file(self) -> None:
        self._edit(lambda body: body["files"].append(dict(body["files"][0])) or "files")

    def m_deep(self) -> None:
        def change(body: dict) -> str:
            deep: Any = 1
            for _ in range(self.rng.choice((101, 300))):  # 300 is about what json can write
                deep = {"l": [deep]}
            body["state"] = deep
            return "deep"  # beyond the nesting bound: must be detected

        self._edit(change)

    def m_deep_text(self) -> None:
        depth = self.rng.choice((2000, 100_000))  # beyond what the JSON parser recurses into
        manifest = self._manifest()
        if manifest is not None:
            manifest.write_bytes(b"[" * depth + b"]" * depth)
            self.value_only = False

    def m_truncate(self) -> None:
        manifest = self._manifest()
        if manifest is None:
            return
        data = manifest.read_bytes()
        manifest.write_bytes(data[: self.rng.randrange(len(data))])
        self.value_only = False

    def m_flip(self) -> None:
        manifest = self._manifest()
        if manifest is None:
            return
        data = bytearray(manifest.read_bytes())
        data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        manifest.write_bytes(bytes(data))
        self.value_only = False

    def m_symlink_data(self) -> None:
        victim = self.rng.choice(self.data)
        if victim.is_symlink() or not victim.is_file():
            return  # already a link or a FIFO
        copy_path = self.sentinel / f"copy-{victim.name}"
        shutil.copy(victim, copy_path)
        victim.unlink()
        victim.symlink_to(copy_path)
        self.value_only = False

    def m_symlink_dir(self) -> None:
        gen = self.step_dir / "g000000"
        if gen.is_symlink() or not gen.exists():
            return
        moved = self.sentinel / "g000000"
        shutil.move(str(gen), moved)
        gen.symlink_to(moved)
        self.value_only = False

    def m_symlink_manifest(self) -> None:
        manifest = self._manifest()
        if manifest is None:
            return
        shutil.copy(manifest, self.sentinel / "manifest.json")
        manifest.unlink()
        manifest.symlink_to(self.sentinel / "manifest.json")
        self.value_only = False

    def m_fifo(self) -> None:
        target = self.rng.choice([self.step_dir / layout.MANIFEST, *self.data])
        if target.is_symlink() or not target.is_file():
            return
        target.unlink()
        os.mkfifo(target)
        self.value_only = False


MUTATIONS = [
    Case.m_leaf,
    Case.m_leaf,
    Case.m_leaf,
    Case.m_delete_key,
    Case.m_extra_key,
    Case.m_path,
    Case.m_path,
    Case.m_number,
    Case.m_number,
    Case.m_dtype,
    Case.m_overlap,
    Case.m_duplicate_file,
    Case.m_deep,
    Case.m_deep_text,
    Case.m_truncate,
    Case.m_flip,
    Case.m_symlink_data,
    Case.m_symlink_dir,
    Case.m_symlink_manifest,
    Case.m_fifo,
]


def _expect_storage_error(fn: Callable[[], Any], what: str, errors: list[str]) -> Any:
    try:
        return fn()
    except StorageError as exc:
        assert str(exc).strip(), f"{what}: {type(exc).__name__} without a message"
        return exc
    except Exception as exc:  # noqa: BLE001 - the property under test
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        return exc


def run_case(
    golden: Path, work: Path, mode: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, bool]:
    """Mutate, exercise every reader and deleter, assert; returns (outcome, value_only)."""
    rng = random.Random(seed)
    case = Case(golden, work, mode, rng)
    case.mutate()
    before = case.snapshot_sentinel()
    key = KEY if mode == "keyed" else None
    watched = WatchedFileSystem(skip_instance_cache=True)
    store = CheckpointStore(
        f"file://{case.root}", fs=watched, retry=FAST_RETRY, config=CONFIG, key=key
    )
    errors: list[str] = []
    label = f"seed {seed} ({mode}: {', '.join(case.kinds)})"

    listed = _expect_storage_error(store.list, "list", errors)
    report = _expect_storage_error(lambda: store.verify(20), "verify", errors)
    loaded20 = _expect_storage_error(lambda: store.load_checkpoint(20), "load(20)", errors)
    newest = _expect_storage_error(store.load_checkpoint, "load()", errors)
    out = case.dir / "export.pt"
    monkeypatch.setattr(cli, "_store", lambda args: store)
    code = _expect_storage_error(
        lambda: cli.main(["ckpt", "export", store.url, "--step", "20", "--out", str(out)]),
        "export",
        errors,
    )
    _expect_storage_error(lambda: store.prune(keep_last=1), "prune", errors)
    _expect_storage_error(lambda: store.gc(grace_s=0.0), "gc", errors)

    assert not errors, f"{label}: not a StorageError: {errors}"
    assert watched.outside(str(case.root)) == [], f"{label}: touched outside the location"
    assert case.snapshot_sentinel() == before, f"{label}: the sentinel directory changed"
    assert isinstance(listed, (list, StorageError))
    detected = isinstance(loaded20, StorageError)
    if not detected:
        if not case.value_only:
            assert_same(state(20), loaded20.state, f"{label}: state")
        assert code == 0 and out.exists(), label
    if not isinstance(report, StorageError) and report.ok:
        assert not detected, f"{label}: verify said ok but load refused: {loaded20}"
    if not isinstance(newest, StorageError):
        assert newest.step in (10, 20), label
        if newest.step == 10 or not case.value_only:
            assert_same(state(newest.step), newest.state, f"{label}: newest")
    if mode == "keyed" and not detected and case.value_only:
        # Under a key a resealed edit is a bad signature, unless it changed nothing.
        assert_same(state(20), loaded20.state, f"{label}: signed state")
    if mode == "keyed" and detected and isinstance(loaded20, SignatureError):
        return "bad signature", case.value_only
    return ("detected" if detected else "harmless"), case.value_only


def fuzz(
    golden: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    cases: int,
    record_property: Callable[[str, Any], None],
) -> None:
    counts: dict[str, int] = {}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        for seed in range(cases):
            future = pool.submit(run_case, golden, tmp_path / "case", mode, seed, monkeypatch)
            try:
                outcome, value_only = future.result(timeout=CASE_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                pytest.fail(f"seed {seed} ({mode}) hung for {CASE_TIMEOUT_S}s")
            name = f"{outcome}{' (value edit)' if value_only else ''}"
            counts[name] = counts.get(name, 0) + 1
    finally:
        pool.shutdown(wait=False)  # a hung case must not hang the suite too
    total = sum(counts.values())
    print(f"\nmanifest fuzz ({mode}): {total} cases: {counts}")
    record_property(f"fuzz_cases_{mode}", total)
    assert total == cases
    assert counts.get("detected", 0) + counts.get("bad signature", 0) > cases // 3


@pytest.mark.parametrize("mode", ["plain", "keyed"])
def test_fuzzed_manifests_are_detected_or_harmless_and_stay_inside(
    golden, tmp_path, monkeypatch, mode, record_property
):
    fuzz(golden, tmp_path, monkeypatch, mode, FAST_CASES, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "keyed"])
def test_many_fuzzed_manifests(golden, tmp_path, monkeypatch, mode, record_property):
    fuzz(golden, tmp_path, monkeypatch, mode, SLOW_CASES, record_property)
