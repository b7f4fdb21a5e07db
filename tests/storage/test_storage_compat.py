"""check_compatible: a loaded state against the model it is meant for."""

from __future__ import annotations

import pytest
import torch

from storage import StateMismatchError, check_compatible


def model(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )


def test_a_matching_state_passes() -> None:
    check_compatible(model(), model().state_dict())
    check_compatible(model().state_dict(), model().state_dict())


def test_a_shape_mismatch_names_the_tensor_and_both_shapes() -> None:
    with pytest.raises(
        StateMismatchError, match=r"0\.weight: shape \[5, 3\] in checkpoint, \[4, 3\] in target"
    ):
        check_compatible(model(4), model(5).state_dict())


def test_missing_and_unexpected_keys_are_named() -> None:
    loaded = dict(model().state_dict())
    del loaded["2.bias"]
    loaded["extra"] = torch.ones(1)
    with pytest.raises(StateMismatchError) as err:
        check_compatible(model(), loaded)
    assert "2.bias: missing from checkpoint" in str(err.value)
    assert "extra: in checkpoint but not in target" in str(err.value)
    check_compatible(model(), {k: v for k, v in loaded.items() if k != "extra"}, strict=False)


def test_a_dtype_mismatch_is_named() -> None:
    loaded = {k: v.half() for k, v in model().state_dict().items()}
    with pytest.raises(
        StateMismatchError, match="dtype torch.float16 in checkpoint, torch.float32"
    ):
        check_compatible(model(), loaded)


def test_nested_optimizer_state_is_compared_by_path() -> None:
    target = {"optim": {"state": {0: {"exp_avg": torch.zeros(3)}}}}
    loaded = {"optim": {"state": {0: {"exp_avg": torch.zeros(4)}}}}
    with pytest.raises(StateMismatchError, match=r"optim.state\[0\].exp_avg: shape \[4\]"):
        check_compatible(target, loaded)
