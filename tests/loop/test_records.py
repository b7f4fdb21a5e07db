"""ShardedRecords: a stream of shards as positions, read in order with one open reader.

Unit tests with an in-memory fake reader; the loader-level check runs torch's
DataLoader with worker processes over the same dataset.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from elastic import ShardedRecords
from elastic.base.errors import ConfigError
from elastic.train.loader import make_sampler, plan
from elastic.train.records import RecordCursor
from elastic.train.sampler import ElasticSampler

LENGTHS = {"s0": 5, "s1": 3, "s2": 0, "s3": 4}  # one empty shard in the middle
STREAM = [f"{url}:{i}" for url, n in LENGTHS.items() for i in range(n)]


class FakeReader:
    """Yields "url:i" from ``start`` on and records every open."""

    def __init__(self, lengths: dict[str, int] = LENGTHS) -> None:
        self.lengths = lengths
        self.calls: list[tuple[str, int]] = []

    def __call__(self, url: str, start: int):
        self.calls.append((url, start))
        for i in range(start, self.lengths[url]):
            yield f"{url}:{i}"


def records(reader: FakeReader | None = None) -> ShardedRecords:
    return ShardedRecords(list(LENGTHS), reader or FakeReader(), lengths=list(LENGTHS.values()))


def collate_list(batch: list[str]) -> list[str]:
    return batch


def test_positions_map_to_shard_and_offset_at_the_shard_boundaries():
    ds = records()
    assert len(ds) == 12
    assert ds.starts == (0, 5, 8, 8, 12)
    expect = {0: (0, 0), 4: (0, 4), 5: (1, 0), 7: (1, 2), 8: (3, 0), 11: (3, 3), 12: (4, 0)}
    for position, cursor in expect.items():
        assert ds.cursor_of(position) == cursor  # never the empty shard 2
        assert ds.position_of(*cursor) == position
    assert ds.position_of(0, 5) == 5  # the end of shard 0 is the start of shard 1
    assert ds.position_of(2, 0) == 8
    for bad in (-1, 13):
        with pytest.raises(IndexError):
            ds.cursor_of(bad)
    with pytest.raises(IndexError):
        ds.position_of(1, 4)


def test_a_run_across_shard_ends_is_the_concatenated_stream():
    reader = FakeReader()
    ds = records(reader)
    assert ds.__getitems__(list(range(3, 10))) == STREAM[3:10]
    # One open per shard crossed (the empty one is never opened).
    assert reader.calls == [("s0", 3), ("s1", 0), ("s3", 0)]
    assert [ds[i] for i in range(12)] == STREAM


def test_a_later_position_in_the_same_shard_skips_forward_and_any_other_reopens():
    reader = FakeReader()
    ds = records(reader)
    assert ds.__getitems__([1, 2]) == ["s0:1", "s0:2"]
    assert ds.__getitems__([4]) == ["s0:4"]  # skips s0:3 without reopening
    assert reader.calls == [("s0", 1)]
    assert ds[0] == "s0:0"  # backwards: reopen at the offset
    assert ds[10] == "s3:2"  # another shard: reopen there
    assert reader.calls == [("s0", 1), ("s0", 0), ("s3", 2)]


def test_pickling_drops_the_open_reader_and_the_copy_reads_on():
    reader = FakeReader()
    ds = records(reader)
    assert ds[6] == "s1:1"
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._it is None and ds._it is not None
    assert copy[7] == "s1:2"
    assert copy.digest == ds.digest


def test_lengths_come_from_count_or_from_reading_each_shard_once():
    counted = ShardedRecords(list(LENGTHS), FakeReader(), count=LENGTHS.__getitem__)
    assert counted.lengths == tuple(LENGTHS.values())
    reader = FakeReader()
    read = ShardedRecords(list(LENGTHS), reader)
    assert read.lengths == tuple(LENGTHS.values())
    assert reader.calls == [(url, 0) for url in LENGTHS]
    assert [read[i] for i in range(12)] == STREAM


def test_a_shard_shorter_than_its_length_is_an_error_naming_it():
    ds = ShardedRecords(["s0", "s1"], FakeReader(), lengths=[5, 4])
    assert ds[7] == "s1:2"
    with pytest.raises(ConfigError, match="shard s1 ended after 3 records, but its length is 4"):
        ds[8]


@pytest.mark.parametrize(
    ("shards", "options", "message"),
    [
        ([], {}, "at least one shard"),
        ("s0", {}, "a list of URLs"),
        (["s0", "s1", "s0"], {"lengths": [1, 1, 1]}, "more than once: s0"),
        (["s0", "s1"], {"lengths": [1]}, "1 lengths for 2 shards"),
        (["s0", "s1"], {"lengths": [1, -2]}, "shard s1 has length -2"),
        (["s0"], {"lengths": [1], "count": len}, "lengths or count, not both"),
        (["s2"], {}, "empty: no records"),
    ],
    ids=["empty", "string", "duplicate", "length-count", "negative", "both", "no-records"],
)
def test_bad_shard_lists_are_refused_with_the_problem_named(shards, options, message):
    with pytest.raises(ConfigError, match=message):
        ShardedRecords(shards, FakeReader(), **options)


def test_cursor_state_holds_shard_and_offset_and_resumes_there():
    ds = records()
    cursor = RecordCursor(ds, 3)
    for _ in range(3):
        cursor.advance()
    state = cursor.state_dict()
    assert (state["cursor"], state["shard"], state["offset"]) == (9, 3, 1)
    assert state["shards_digest"] == ds.digest
    resumed = RecordCursor(records(), 3, seed=7)  # the order does not depend on the seed
    resumed.load_state_dict(state)
    assert resumed.cursor == 9 and resumed.global_batch() == [9, 10, 11]
    # The cursor is read from (shard, offset), not from the position.
    resumed.load_state_dict({**state, "cursor": 0, "shard": 1, "offset": 1})
    assert resumed.cursor == 6


def test_a_cursor_over_a_changed_shard_list_is_refused():
    state = RecordCursor(records(), 3).state_dict()
    changed = ShardedRecords(["s0", "s1", "s3", "s2"], FakeReader(), lengths=[5, 3, 4, 0])
    with pytest.raises(ConfigError, match="the shard list changed"):
        RecordCursor(changed, 3).load_state_dict(state)
    map_style = ElasticSampler(12, 3, shuffle=False).state_dict()
    with pytest.raises(ConfigError, match="no shards_digest"):
        RecordCursor(records(), 3).load_state_dict(map_style)


def test_the_loader_reads_shards_in_order_and_refuses_to_shuffle_them():
    ds = records()
    cursor = make_sampler(ds, len(ds), 4, seed=0, shuffle=None, drop_last=False)
    assert isinstance(cursor, RecordCursor) and not cursor.shuffle
    assert make_sampler(range(12), 12, 4, seed=0, shuffle=None, drop_last=False).shuffle
    with pytest.raises(ConfigError, match="read in shard order"):
        make_sampler(ds, len(ds), 4, seed=0, shuffle=True, drop_last=False)


@pytest.mark.parametrize("micro", [None, 3], ids=["shares", "micro-batches"])
def test_dataloader_workers_over_shards_give_the_in_order_stream(micro):
    # Two ranks' plans of the same steps, each through a DataLoader with two
    # worker processes (each keeps its own reader and skips the other's
    # batches): together, the stream once.
    ds = records()
    cursor = RecordCursor(ds, 4)
    ids: list[list[list[int]]] = [[], []]
    for _ in range(3):
        for rank in range(2):
            ids[rank] += [part.ids for part in plan(cursor, rank, 2, micro)]
        cursor.advance()
    seen = []
    for rank in range(2):
        loader = DataLoader(ds, batch_sampler=ids[rank], collate_fn=collate_list, num_workers=2)
        for batch, got in zip(ids[rank], loader, strict=True):
            assert got == [STREAM[i] for i in batch]
            seen += batch
    assert sorted(seen) == list(range(12))


def test_a_plain_batch_sampler_over_shards_gives_the_stream_with_workers():
    ds = ShardedRecords([f"t{i}" for i in range(4)], TensorReader(), lengths=[7, 13, 2, 11])
    batches = [list(range(a, b)) for a, b in [(0, 5), (5, 12), (12, 21), (21, 22), (22, 33)]]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2)
    got = torch.cat(list(loader))
    assert torch.equal(got, torch.arange(33.0))


class TensorReader:
    """Shard ``tK`` holds the positions that follow the shards before it."""

    lengths = [7, 13, 2, 11]

    def __call__(self, url: str, start: int):
        k = int(url[1:])
        base = sum(self.lengths[:k])
        for i in range(start, self.lengths[k]):
            yield torch.tensor(float(base + i))
