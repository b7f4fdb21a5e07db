"""State trees to JSON + tensors and back, exactly; every dtype's raw bytes."""

from __future__ import annotations

import json

import pytest
import torch

from storage import CheckpointStore, UnsupportedStateError
from storage.serialize import decode_tree, dtype_from_name, encode_tree, format_path
from tests.storage.testlib import Location, assert_same, rich_state

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def round_trip(tree: object) -> object:
    tensors: dict[str, torch.Tensor] = {}

    def add(path: tuple, t: torch.Tensor) -> str:
        tensors[json.dumps(list(path))] = t
        return json.dumps(list(path))

    encoded = json.loads(json.dumps(encode_tree(tree, add), allow_nan=False))
    return decode_tree(encoded, tensors.__getitem__)


def test_the_tree_round_trips_through_json_with_key_and_container_types() -> None:
    state = rich_state()
    assert_same(state, round_trip(state))


def test_int_keys_stay_ints_and_tuples_stay_tuples() -> None:
    tree = {"state": {0: {"step": 1}, 1: {}}, "betas": (0.9, 0.999), "mixed": {"0": "s", 0: "i"}}
    back = round_trip(tree)
    assert list(back["state"]) == [0, 1] and isinstance(back["betas"], tuple)
    assert back["mixed"] == {"0": "s", 0: "i"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly_through_a_store(
    memory_location: Location, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=gen)  # any bit pattern
    tensor = raw.view(dtype).reshape(2, -1)
    state = {"t": tensor, "t_col": tensor.t(), "scalar": tensor.reshape(-1)[0].clone()}
    store: CheckpointStore = memory_location.store()
    store.save(1, state)
    assert_same(state, store.load()[1])


def test_only_real_dtypes_are_accepted_by_name() -> None:
    assert dtype_from_name("bfloat16") is torch.bfloat16
    for bad in ("Tensor", "__class__", "nn"):
        with pytest.raises(UnsupportedStateError, match="unknown tensor dtype"):
            dtype_from_name(bad)


def test_key_paths_are_readable_in_messages() -> None:
    assert format_path(("optim", "state", 0, "exp_avg")) == "optim.state[0].exp_avg"
    assert format_path(()) == "<root>"
