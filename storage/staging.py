"""A reusable CPU buffer for asynchronous-save snapshots.

Copying into freshly allocated memory costs a page fault per 4 KiB page the
first time it is touched; on the 2-core VMs we measure on that made the
snapshot of 288 MB take ~0.4 s, most of `save_async`'s blocking time, where a
copy into memory that is already mapped runs at memory bandwidth.  The store
allows at most one save in flight and waits for the previous one before taking
the next snapshot, so one buffer, kept between saves, is never written while a
save still reads it.  On CUDA hosts the buffer is pinned so the device-to-host
copy is a DMA and not a staged copy.

The price is that the buffer (this rank's share of the state) stays allocated
between saves; `StoreConfig.keep_snapshot_buffer=False` frees it after each
save instead.
"""

from __future__ import annotations

import threading

import torch


class StagingBuffer:
    """One growable uint8 CPU buffer; `take(n)` hands out its first n bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        buf = self._buf
        return 0 if buf is None else buf.numel()

    def take(self, nbytes: int, *, pin: bool) -> torch.Tensor:
        """A 1-D uint8 CPU tensor of exactly `nbytes`, backed by the kept buffer.

        The caller must not hold a previous `take` result any more: the store
        guarantees it by finishing the in-flight save first.
        """
        with self._lock:
            buf = self._buf
            if buf is None or buf.numel() < nbytes or (pin and not buf.is_pinned()):
                self._buf = None  # drop the old one before allocating: peak is one buffer
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
                self._buf = buf
            return buf[:nbytes]

    def free(self) -> None:
        with self._lock:
            self._buf = None
