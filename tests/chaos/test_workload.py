"""The workload's storage faults reach the store through the Trainer's public factory."""

from __future__ import annotations

import pytest
import torch

from chaos.faults import StorageFault, WorkerFaults, manifest_glob
from chaos.workload import store_factory
from storage import CheckpointStore, StorageError


def test_without_storage_faults_or_breaks_the_trainer_keeps_its_own_store() -> None:
    assert store_factory(WorkerFaults(), broken=False) is None


def test_a_planned_storage_fault_acts_on_the_store_the_factory_opens(tmp_path) -> None:
    url = f"file://{tmp_path}/ckpt"
    never = StorageFault("fail", path=manifest_glob(1), ops=("write",), times=None, permanent=True)
    open_store = store_factory(WorkerFaults(storage=(never,)), broken=False)
    assert open_store is not None
    store = open_store(url, key=None)
    with pytest.raises(StorageError, match="injected fault"):
        store.save(1, {"w": torch.zeros(2)})
    # The glob names step 1 only: the same store commits step 2, and a plain
    # store (no fault plan) sees exactly that.
    store.save(2, {"w": torch.zeros(2)})
    assert [info.step for info in CheckpointStore(url).list()] == [2]
