"""A sharded stream of records read in order: the shape of LLM pretraining data.

A list of shards (files or URLs, e.g. token shards) whose records are read in
order, shard after shard. :class:`ShardedRecords` presents the concatenated
stream as a map-style dataset over global positions, so ``job.loader(...)``
splits it like any dataset: each step's global batch is the next
``global_batch_size`` positions, cut per World by the existing share and
micro-batch logic. Exactly-once across failures and joins, and the same result
for any number of workers, therefore come from the same machinery as for a
map-style dataset.

The cursor a checkpoint holds is ``(shard, offset)`` (:class:`RecordCursor`),
with a digest of the shard list: a resume over a changed list is refused
instead of silently reading other records.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..base.errors import ConfigError
from .sampler import ElasticSampler


def _locate(starts: Sequence[int], position: int) -> tuple[int, int]:
    """(shard, offset) of ``position``; the end of the stream is (shard count, 0)."""
    total = starts[-1]
    if not 0 <= position <= total:
        raise IndexError(f"position {position} outside the stream of {total} records")
    if position == total:
        return len(starts) - 1, 0
    # The last shard starting at or before the position: never an empty shard.
    shard = bisect.bisect_right(starts, position) - 1
    return shard, position - starts[shard]


def _position(starts: Sequence[int], shard: int, offset: int) -> int:
    n = len(starts) - 1
    if shard == n and offset == 0:
        return starts[-1]
    if not 0 <= shard < n:
        raise IndexError(f"shard {shard} outside the {n} shards")
    length = starts[shard + 1] - starts[shard]
    if not 0 <= offset <= length:
        raise IndexError(f"offset {offset} outside shard {shard} of {length} records")
    return starts[shard] + offset


class ShardedRecords:
    """The records of ``shards``, in order, as a map-style dataset over positions.

    ``read(url, start)`` yields the records of one shard from record index
    ``start`` on. A reader that can seek (fixed-size records, an index) should;
    one that cannot may do ``itertools.islice(records(url), start, None)``.

    Mapping a global position to ``(shard, offset)`` needs every shard's
    length: pass ``lengths``, or ``count(url)`` (e.g. from a file's size or an
    index), or neither, and each shard is read through once here to count its
    records (a full pass over the data at construction, on every rank).

    An open reader is kept per process (a DataLoader worker keeps its own): a
    position later in the same shard is reached by skipping forward, any other
    by reopening with ``read(url, offset)``; a run of positions crossing a
    shard's end continues into the next shard. Pickling (to DataLoader workers)
    drops the open reader, so ``read`` must itself be picklable (a module-level
    function).
    """

    def __init__(
        self,
        shards: Sequence[str],
        read: Callable[[str, int], Iterable[Any]],
        lengths: Sequence[int] | None = None,
        count: Callable[[str], int] | None = None,
    ) -> None:
        if isinstance(shards, str):
            raise ConfigError(f"shards must be a list of URLs, got the string {shards!r}")
        urls = list(shards)
        if not urls:
            raise ConfigError("ShardedRecords needs at least one shard, got an empty list")
        for url in urls:
            if not isinstance(url, str):
                raise ConfigError(f"a shard must be a str URL, got {url!r}")
        dups = sorted(u for u, n in Counter(urls).items() if n > 1)
        if dups:
            raise ConfigError(f"shards listed more than once: {', '.join(dups)}")
        if lengths is not None and count is not None:
            raise ConfigError("pass lengths or count, not both")
        if lengths is not None:
            if len(lengths) != len(urls):
                raise ConfigError(
                    f"{len(lengths)} lengths for {len(urls)} shards: one length per shard"
                )
            sizes = list(lengths)
        elif count is not None:
            sizes = [count(u) for u in urls]
        else:
            sizes = [sum(1 for _ in read(u, 0)) for u in urls]
        for url, n in zip(urls, sizes, strict=True):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"shard {url} has length {n!r}: a length is an int >= 0")
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        if starts[-1] == 0:
            raise ConfigError(f"every one of the {len(urls)} shards is empty: no records")
        self.shards: tuple[str, ...] = tuple(urls)
        self.lengths: tuple[int, ...] = tuple(sizes)
        self.starts: tuple[int, ...] = tuple(starts)  # prefix sums, one more than shards
        self._read = read
        self._it: Iterator[Any] | None = None
        self._shard = -1  # shard of the open reader
        self._pos = 0  # global position of the record it yields next

    @property
    def digest(self) -> str:
        """sha256 of the shard URLs and lengths: what a cursor is valid for."""
        text = json.dumps([[u, n] for u, n in zip(self.shards, self.lengths, strict=True)])
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        return self.starts[-1]

    def position_of(self, shard: int, offset: int) -> int:
        """Global position of record ``offset`` of shard ``shard``."""
        return _position(self.starts, shard, offset)

    def cursor_of(self, position: int) -> tuple[int, int]:
        """(shard, offset) of a global position; ``len(self)`` is (shard count, 0)."""
        return _locate(self.starts, position)

    def __getitem__(self, position: int) -> Any:
        return self._fetch(position)

    def __getitems__(self, positions: Sequence[int]) -> list[Any]:
        # torch's DataLoader passes a batch's index list; a rank's share is a
        # contiguous increasing run, read by one reader without reopening.
        return [self._fetch(p) for p in positions]

    def _fetch(self, position: int) -> Any:
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} outside the stream of {len(self)} records")
        if self._it is None or position < self._pos or position >= self.starts[self._shard + 1]:
            shard, offset = _locate(self.starts, position)
            self.close()
            self._it = iter(self._read(self.shards[shard], offset))
            self._shard, self._pos = shard, position
        while self._pos < position:
            self._next()
        return self._next()

    def _next(self) -> Any:
        try:
            record = next(self._it)
        except StopIteration:
            shard = self._shard
            got = self._pos - self.starts[shard]
            self.close()
            raise ConfigError(
                f"shard {self.shards[shard]} ended after {got} records, but its length is "
                f"{self.lengths[shard]}: read() yields fewer records than lengths/count say"
            ) from None
        self._pos += 1
        return record

    def close(self) -> None:
        """Close the open reader (a generator's ``finally``/``with`` runs)."""
        it, self._it, self._shard, self._pos = self._it, None, -1, 0
        closer = getattr(it, "close", None)
        if closer is not None:
            closer()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_it=None, _shard=-1, _pos=0)
        return state

    def __repr__(self) -> str:
        return f"ShardedRecords({len(self.shards)} shards, {len(self)} records)"


class RecordCursor(ElasticSampler):
    """The data cursor over a :class:`ShardedRecords`: positions in shard order.

    Its state holds the cursor as ``(shard, offset)`` and the digest of the
    shard list it is valid for.
    """

    def __init__(
        self,
        records: ShardedRecords,
        global_batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            len(records), global_batch_size, seed=seed, shuffle=False, drop_last=drop_last
        )
        self.starts = records.starts
        self.shards_digest = records.digest

    def state_dict(self) -> dict[str, Any]:
        shard, offset = _locate(self.starts, self.cursor)
        return {
            **super().state_dict(),
            "shard": shard,
            "offset": offset,
            "shards_digest": self.shards_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        digest = state.get("shards_digest")
        if digest is None:
            raise ConfigError(
                "the sampler state holds no shards_digest: it was saved by a run over a "
                "map-style dataset, not over these shards"
            )
        if digest != self.shards_digest:
            raise ConfigError(
                f"the shard list changed: the state's shards_digest {digest[:16]}... is not "
                f"this run's {self.shards_digest[:16]}... (other shard URLs, order or lengths), "
                "so its (shard, offset) cursor would point at other records"
            )
        # The order does not depend on the seed (records are read in shard
        # order), so a state saved under another seed is not refused for it.
        super().load_state_dict({k: v for k, v in state.items() if k != "seed"})
        try:
            self.cursor = _position(self.starts, int(state["shard"]), int(state["offset"]))
        except IndexError as exc:
            raise ConfigError(f"the sampler state's cursor is outside the shards: {exc}") from exc
