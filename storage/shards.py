"""Sharded optimizer state inside a checkpoint: how its pieces join back into
one optimizer ``state``.

A sharded run (``elastic run --shard-state``) writes no optimizer state in the
replicated part; each rank's own part holds, under ``SHARDS_KEY``, the slices
of the shards it is first owner of, keyed ``"INDEX:START:STOP"`` (elements
``[START, STOP)`` of the flattened parameter ``INDEX`` in the optimizer's
state_dict order), and under ``META_KEY`` the optimizer's name in the
replicated state and every parameter's shape. The runtime joins the pieces to
resume at another size or without sharding; ``elastic ckpt export`` joins them
so that the exported file holds the whole optimizer state, as a replicated
run's would. Here, not in elastic/, because storage must read it without the
runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import CorruptCheckpointError

SHARDS_KEY = "optimizer_shards"  # a rank part's slices of the optimizer state
META_KEY = "optimizer_shards_meta"  # {"optimizer": name, "shapes": [[d0, d1, ...], ...]}


def join_pieces(
    parts: Sequence[Mapping[str, Any]], shapes: Sequence[Sequence[int]]
) -> dict[int, dict[str, Any]]:
    """A torch optimizer ``state`` from the parts' pieces; CorruptCheckpointError
    naming what is wrong unless the pieces cover every parameter exactly once."""
    import torch

    pieces: dict[int, list[tuple[int, int, Mapping[str, Any]]]] = {}
    for part in parts:
        for key, st in part.items():
            try:
                name, start, stop = str(key).split(":")
                index, a, b = int(name), int(start), int(stop)
            except ValueError:
                raise CorruptCheckpointError(
                    f"a checkpoint's shard key {key!r} is not NAME:START:STOP"
                ) from None
            if not isinstance(st, Mapping):
                raise CorruptCheckpointError(f"a checkpoint's shard {key!r} is not a dict")
            pieces.setdefault(index, []).append((a, b, st))
    extra = sorted(set(pieces) - set(range(len(shapes))))
    if extra:
        raise CorruptCheckpointError(
            f"the checkpoint's shards name parameters the optimizer lacks: {extra}"
        )
    out: dict[int, dict[str, Any]] = {}
    for index, shape in enumerate(shapes):
        numel = 1
        for d in shape:
            numel *= int(d)
        spans = sorted(pieces.get(index, []), key=lambda s: s[0])
        at = 0
        for a, b, _ in spans:
            if a != at:
                raise CorruptCheckpointError(
                    f"the checkpoint's shards of parameter {index} leave "
                    f"{'an overlap' if a < at else 'a gap'} at element {min(a, at)}"
                )
            at = b
        if at != numel:
            raise CorruptCheckpointError(
                f"the checkpoint's shards do not cover parameter {index}: elements "
                f"{at}..{numel} missing"
            )
        if not spans or not spans[0][2]:
            continue  # never stepped: no state
        full: dict[str, Any] = {}
        for k, v in spans[0][2].items():
            sliced = (
                isinstance(v, torch.Tensor) and v.dim() and v.numel() == spans[0][1] - spans[0][0]
            )
            if sliced:
                try:
                    joined = torch.cat([s[2][k].reshape(-1) for s in spans])
                except (KeyError, RuntimeError, AttributeError) as exc:
                    raise CorruptCheckpointError(
                        f"the checkpoint's shards of parameter {index} disagree on {k!r}: {exc}"
                    ) from None
                full[k] = joined.view(*[int(d) for d in shape])
            else:
                full[k] = v  # a per-parameter scalar (Adam's step): the same on every piece
        out[index] = full
    return out


def with_full_optimizer(
    state: Mapping[str, Any], per_rank: Mapping[int, Mapping[str, Any]]
) -> tuple[dict[str, Any], str | None]:
    """``state`` with a sharded checkpoint's optimizer state joined back into
    its optimizer entry, and a note when it could not be (None when nothing was
    sharded or it was joined)."""
    # A damaged or foreign checkpoint may hold anything here: only dicts count.
    trees = [tree for _, tree in sorted(per_rank.items()) if isinstance(tree, Mapping)]
    parts = [tree[SHARDS_KEY] for tree in trees if SHARDS_KEY in tree]
    if not parts or not isinstance(state, Mapping):
        return dict(state) if isinstance(state, Mapping) else state, None
    if not all(isinstance(p, Mapping) for p in parts):
        raise CorruptCheckpointError(f"a checkpoint's {SHARDS_KEY!r} part is not a dict")
    meta = next((tree[META_KEY] for tree in trees if META_KEY in tree), None)
    name = meta.get("optimizer") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or name not in state or not isinstance(state[name], Mapping):
        return dict(state), (
            "the checkpoint's optimizer state is sharded and names no optimizer entry "
            "(saved before 2026-12-04): the export holds the model, not that state"
        )
    shapes = meta.get("shapes")
    if not isinstance(shapes, list) or not all(
        isinstance(sh, list) and all(isinstance(d, int) and d >= 0 for d in sh) for sh in shapes
    ):
        raise CorruptCheckpointError(f"a checkpoint's {META_KEY!r} holds no list of shapes")
    out = dict(state)
    entry = dict(state[name])
    entry["state"] = join_pieces(parts, shapes)
    out[name] = entry
    return out, None
