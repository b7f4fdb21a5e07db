"""The store's contract, run on every backend: local disk, memory, S3 (moto server)."""

from __future__ import annotations

import logging

import pytest
import torch

from storage import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FenceError,
    MissingPartsError,
    StaleWriterError,
    StateMismatchError,
    StoreConfig,
    layout,
)
from tests.storage.testlib import Location, assert_same, per_rank_state, rich_state, save_ranks


def small(i: int) -> dict:
    return {"w": torch.full((4,), float(i)), "step": i}


class StoreContract:
    """Behaviour every backend must show; a subclass supplies the `loc` fixture."""

    @pytest.fixture
    def loc(self) -> Location:
        raise NotImplementedError

    def test_save_then_load_round_trips_exactly(self, loc: Location) -> None:
        state = rich_state()
        info = loc.store().save(5, state, metadata={"loss": 0.5, "tags": ["a"]})
        assert (info.step, info.committed, info.world_size) == (5, True, 1)
        loaded = loc.store().load_checkpoint()
        assert (loaded.step, loaded.generation, loaded.world_size) == (5, 0, 1)
        assert_same(state, loaded.state)
        assert loaded.metadata == {"loss": 0.5, "tags": ["a"]}
        assert loaded.per_rank == {0: {}}

    def test_load_returns_the_newest_committed_step(self, loc: Location) -> None:
        store = loc.store()
        for step in (1, 3, 2):
            store.save(step, small(step))
        step, state = loc.store().load()
        assert step == 3
        assert_same(small(3), state)
        step, state = loc.store().load(2)
        assert step == 2
        assert_same(small(2), state)

    def test_load_of_a_missing_step_names_it_and_lists_the_available_ones(
        self, loc: Location
    ) -> None:
        store = loc.store()
        store.save(1, small(1))
        store.save(2, small(2))
        with pytest.raises(CheckpointNotFoundError, match=r"step 7 .*available steps: 1, 2"):
            loc.store().load(7)

    def test_an_empty_location_is_a_clear_error(self, loc: Location) -> None:
        store = loc.store()
        assert store.list() == []
        assert store.latest() is None
        with pytest.raises(CheckpointNotFoundError, match="empty location"):
            store.load()
        with pytest.raises(CheckpointNotFoundError, match="empty location"):
            store.verify()

    def test_list_is_sorted_and_leaves_out_uncommitted_steps(self, loc: Location) -> None:
        store = loc.store()
        store.save(20, small(20))
        store.save(10, small(10))
        loc.write(f"{layout.step_dir(30)}/g000000/r00000-abandoned/data-00000.bin", b"partial")
        fresh = loc.store()
        assert [i.step for i in fresh.list()] == [10, 20]
        assert fresh.latest().step == 20
        assert fresh.load()[0] == 20

    @pytest.mark.parametrize(
        ("target", "damage", "reason"),
        [
            ("data", "bitflip", "checksum"),
            ("data", "truncate", "size"),
            ("data", "delete", "missing"),
            ("manifest", "bitflip", "manifest"),
            ("manifest", "truncate", "manifest"),
        ],
    )
    def test_damage_to_the_newest_checkpoint_is_detected_and_load_falls_back(
        self, loc: Location, caplog: pytest.LogCaptureFixture, target: str, damage: str, reason: str
    ) -> None:
        store = loc.store()
        store.save(1, small(1))
        store.save(2, small(2))
        rel = loc.data_files(2)[0] if target == "data" else loc.manifest(2)
        {"bitflip": loc.flip_bit, "truncate": loc.truncate, "delete": loc.delete}[damage](rel)

        report = loc.store().verify()
        assert report.bad_steps == [2]
        (problem,) = report.problems
        assert problem.path.endswith(rel) and problem.reason == reason
        with caplog.at_level(logging.WARNING, logger="storage"):
            step, state = loc.store().load()
        assert step == 1
        assert_same(small(1), state)
        assert "step 2" in caplog.text and "falling back" in caplog.text
        with pytest.raises(CorruptCheckpointError, match=rel.split("/")[-1]):
            loc.store().load(2)

    def test_verify_names_each_bad_file(self, loc: Location) -> None:
        store = loc.store(config=StoreConfig(max_file_bytes=64))
        store.save(3, {"a": torch.arange(64, dtype=torch.float32)})  # 256 bytes: 4 files
        files = loc.data_files(3)
        assert len(files) == 4
        loc.flip_bit(files[0])
        loc.truncate(files[2])
        report = loc.store().verify(3)
        assert not report.ok
        named = {(f, p.reason) for p in report.problems for f in files if p.path.endswith(f)}
        assert len(report.problems) == 2
        assert named == {(files[0], "checksum"), (files[2], "size")}

    def test_commit_from_stale_generation_is_refused(self, loc: Location) -> None:
        store = loc.store()
        store.save(1, small(1), generation=1, fence=lambda step: True)
        with pytest.raises(StaleWriterError, match="generation 1 is no longer current"):
            store.save(2, small(2), generation=1, fence=lambda step: False)
        assert not loc.exists(loc.manifest(2))
        assert loc.all_files(2) == []  # the refused writer's files are gone
        assert loc.store().load()[0] == 1

    def test_files_of_a_stale_generation_are_never_referenced(self, loc: Location) -> None:
        state = small(2)
        # Generation 1 (two ranks): rank 1 finished its part, then generation 2 took over.
        (part,) = save_ranks(loc, 2, state, 2, ranks=[1], generation=1).values()
        assert part.committed is False
        refused = save_ranks(loc, 2, state, 2, ranks=[0], generation=1, fence=lambda s: False)
        assert isinstance(refused[0], StaleWriterError)
        info = loc.store().save(2, state, generation=2, fence=lambda s: True)
        assert info.generation == 2
        manifest = loc.store()._read_manifest(2)
        assert manifest.files and all(f.path.startswith("g000002/") for f in manifest.files)
        assert_same(state, loc.store().load()[1])

    def test_fence_is_called_once_right_before_the_commit(self, loc: Location) -> None:
        seen = []

        def fence(step: int) -> bool:
            seen.append((step, loc.exists(loc.manifest(step)), len(loc.data_files(step))))
            return True

        loc.store().save(4, small(4), fence=fence)
        assert seen == [(4, False, 1)]
        assert loc.exists(loc.manifest(4))

    def test_a_fence_that_raises_commits_nothing(self, loc: Location) -> None:
        def fence(step: int) -> bool:
            raise RuntimeError("etcd unreachable")

        with pytest.raises(FenceError, match="etcd unreachable"):
            loc.store().save(4, small(4), fence=fence)
        assert not loc.exists(loc.manifest(4))
        assert loc.store().list() == []

    def test_three_ranks_write_disjoint_balanced_parts_and_any_world_size_loads(
        self, loc: Location
    ) -> None:
        state = rich_state()
        results = save_ranks(loc, 10, state, 3, generation=4)
        assert results[0].committed and not results[1].committed and not results[2].committed
        files = loc.data_files(10)
        writers = sorted(f.split("/")[2].split("-")[0] for f in files)
        assert writers == ["r00000", "r00001", "r00002"]
        assert all(f.split("/")[1] == "g000004" for f in files)
        sizes = [len(loc.read(f)) for f in files]
        assert max(sizes) - min(sizes) <= 1  # byte-balanced (each also holds 16 own bytes)

        loaded = loc.store().load_checkpoint()
        assert (loaded.step, loaded.world_size, loaded.generation) == (10, 3, 4)
        assert_same(state, loaded.state)
        assert_same({r: per_rank_state(r) for r in range(3)}, loaded.per_rank)
        # A job restarting with two ranks: each picks per-rank state by itself.
        for rank in (0, 1):
            _, merged = loc.store().load(rank=rank)
            assert_same(per_rank_state(rank)["rng"], merged["rng"])
            assert_same(state["model"], merged["model"])
        with pytest.raises(StateMismatchError, match="rank 3"):
            loc.store().load(rank=3)

    def test_a_rank_that_never_writes_its_part_fails_the_save_naming_it(
        self, loc: Location
    ) -> None:
        results = save_ranks(loc, 10, small(10), 3, ranks=[0, 1], timeout=0.3)
        assert isinstance(results[0], MissingPartsError)
        assert "rank(s) [2] of world size 3" in str(results[0])
        assert not loc.exists(loc.manifest(10))

    def test_async_save_round_trips(self, loc: Location) -> None:
        state = rich_state()
        handle = loc.store().save_async(3, state)
        info = handle.wait(timeout=60)
        assert handle.done() and info.step == 3
        assert_same(state, loc.store().load(3)[1])

    def test_prune_keeps_the_last_n_every_kth_and_the_newest_that_verifies(
        self, loc: Location
    ) -> None:
        store = loc.store()
        for step in range(1, 8):
            store.save(step, small(step))
        assert store.prune(keep_last=2, keep_every=3) == [1, 2, 4, 5]
        assert [i.step for i in loc.store().list()] == [3, 6, 7]
        loc.flip_bit(loc.data_files(7)[0])
        # keep_last=1 keeps 7, but 7 is corrupt: 6 is the newest good one and stays.
        assert loc.store().prune(keep_last=1) == [3]
        assert loc.store().load()[0] == 6

    def test_gc_removes_leftovers_of_old_writers_and_keeps_live_ones(self, loc: Location) -> None:
        store = loc.store()
        store.save(1, small(1), generation=1)
        committed = set(loc.all_files(1))
        stale = [
            # another writer of the committed step
            f"{layout.step_dir(1)}/{layout.data_file(layout.new_writer_dir(0, 0), 0)}",
            # the temp file of a crashed commit
            f"{layout.step_dir(1)}/{layout.temp_name(layout.MANIFEST)}",
            # an older step than the newest commit
            f"{layout.step_dir(0)}/{layout.data_file(layout.new_writer_dir(1, 0), 0)}",
            # an older generation than the newest commit
            f"{layout.step_dir(5)}/{layout.data_file(layout.new_writer_dir(0, 0), 0)}",
        ]
        for rel in stale:
            loc.write(rel, b"leftover")
        # A save in flight: rank 1 is done, rank 0 is not.
        live = save_ranks(loc, 2, small(2), 2, ranks=[1], generation=1)
        assert live[1].committed is False
        live_files = set(loc.all_files(2))

        removed = loc.store().gc()
        assert sorted(removed) == sorted(stale)
        assert set(loc.all_files(1)) == committed
        assert set(loc.all_files(2)) == live_files
        assert loc.store().verify().ok
        # Past the grace period nobody can be writing step 2 any more.
        assert sorted(loc.store().gc(grace_s=0.0)) == sorted(live_files)

    def test_a_committed_step_is_never_overwritten(self, loc: Location) -> None:
        loc.store().save(1, small(1))
        with pytest.raises(CheckpointExistsError, match="step 1 is already committed"):
            loc.store().save(1, small(99))
        assert_same(small(1), loc.store().load(1)[1])


class TestLocalDisk(StoreContract):
    @pytest.fixture
    def loc(self, local_location: Location) -> Location:
        return local_location


class TestMemory(StoreContract):
    @pytest.fixture
    def loc(self, memory_location: Location) -> Location:
        return memory_location


@pytest.mark.s3
class TestS3(StoreContract):
    @pytest.fixture
    def loc(self, s3_location: Location) -> Location:
        return s3_location
