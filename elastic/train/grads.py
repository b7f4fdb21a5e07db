"""This rank's weighted gradient of a step, in the one flat buffer the all-reduce runs on.

A rank's contribution to the step is ``sum_i w_i g_i`` over the micro-batches
it computed (``w_i`` = the micro-batch's share of the global batch, ``g_i``
its mean-loss gradient). The last slot of the buffer carries the loss sum.

In place (the default): every parameter's ``.grad`` is a view into the
buffer, so autograd accumulates straight into it and the all-reduce leaves the
averaged gradient where the optimizer reads it: no flattening copy, no
gradient-sized allocation per step (on CPU a fresh multi-MB tensor is fresh
pages, faulted in on every backward). Micro-batches of unequal weight are
handled by rescaling the running sum when the weight changes (the invariant:
the buffer holds ``sum_j (w_j / w_cur) g_j``), so the common case of equal
micro-batches costs one multiply per step.

Overlap: the buffer is cut into buckets of whole parameters, the last layers
first (backward produces their gradients first). During the step's last
micro-batch a bucket whose every gradient has been accumulated is all-reduced
at once, while backward goes on. Buckets start strictly in index order on
every rank (a finished bucket waits for the ones before it), so the ranks'
collectives always pair up; whatever did not start during backward (an unused
parameter, a rank without a share) starts at the exchange. The last bucket
holds the loss slot and starts at the exchange, when the loss is known.

Exact (``exact=True``): each micro-batch's gradient is added in float64, where
a sum of a few float32 values is exact, so the update does not depend on how
micro-batches are spread over ranks. It copies per micro-batch and does not
overlap; it is the mode for bitwise reproducibility, not for speed.

Parameters of different dtypes, or a ``.grad`` the script replaced (a
``zero_grad(set_to_none=True)`` on the raw optimizer or the module), fall back
to copying that gradient in; the result is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..base.errors import ConfigError

BUCKET_BYTES = 4 << 20  # a few MB: enough to overlap, few enough collectives

Launch = Callable[[torch.Tensor], Any]  # starts an all-reduce of a slice, returns its handle


class StepGradients:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        *,
        exact: bool,
        device: torch.device,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        # Buffer order: the last parameters first, as backward produces them.
        self.params = list(reversed(params))
        self.n = sum(p.numel() for p in params)
        dtypes = {p.dtype for p in params}
        self.in_place = not exact and len(dtypes) == 1
        self.dtype = torch.float64 if exact else params[0].dtype
        self.device = device
        self._buckets = self._cut(bucket_bytes)
        self._bucket_of = {id(p): k for k, (_, _, idx) in enumerate(self._buckets) for p in idx}
        self._alloc()
        self._launch: Launch | None = None  # set while overlapping (the last micro-batch)
        self._started: list[Any] = []
        self._next = 0  # the next bucket to start
        self._left: list[int] = []  # per bucket, gradients not yet accumulated
        self._seen: set[int] = set()
        self._error: BaseException | None = None
        if self.in_place:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _cut(self, bucket_bytes: int) -> list[tuple[int, int, list[torch.nn.Parameter]]]:
        buckets, lo, offset, members = [], 0, 0, []
        for p in self.params:
            members.append(p)
            offset += p.numel()
            if (offset - lo) * p.element_size() >= bucket_bytes:
                buckets.append((lo, offset, members))
                lo, members = offset, []
        if members or not buckets:
            buckets.append((lo, offset, members))
        lo, _, members = buckets[-1]
        buckets[-1] = (lo, self.n + 1, members)  # the loss slot rides on the last one
        return buckets

    def _alloc(self) -> None:
        # One slot more: the step's loss sum rides on the same all-reduce.
        self.buf = torch.zeros(self.n + 1, dtype=self.dtype, device=self.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.buf[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._view_of = {id(p): v for p, v in zip(self.params, self.views, strict=True)}
        self._weight: float | None = None  # in place: the weight the running sum is kept at

    # -- one step -------------------------------------------------------------------

    def begin(self) -> None:
        """A step starts: in place, point every ``.grad`` at the buffer."""
        self._weight = None
        self._launch = None
        self._started, self._next, self._error = [], 0, None
        if self.in_place:
            for p, v in zip(self.params, self.views, strict=True):
                g = p.grad
                if g is None:
                    v.zero_()
                    p.grad = v
                elif not _is_view(g, v):
                    v.copy_(g)
                    p.grad = v
        else:
            self.buf.zero_()

    def prepare(self, weight: float) -> None:
        """The next micro-batch (share ``weight``) is about to be computed."""
        if not self.in_place:
            return
        self._absorb(self.params)
        if self._weight is None:
            self._weight = weight
        elif weight != self._weight:
            # Keep the invariant buf = sum_j (w_j / w_cur) g_j before the
            # micro-batch's backward adds its own g_cur.
            self.buf[: self.n].mul_(self._weight / weight)
            self._weight = weight

    def overlap(self, launch: Launch) -> None:
        """The step's last micro-batch is next: start buckets as backward fills them."""
        if not self.in_place:
            return
        self._launch = launch
        self._left = [len(members) for _, _, members in self._buckets]
        self._seen = set()

    def fold(self, weight: float) -> None:
        """The micro-batch just computed, of share ``weight``, joins the sum."""
        if self.in_place:
            return  # autograd added it already (a replaced .grad is absorbed later)
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params
        ]
        self.buf[: self.n].add_(torch.cat(grads).to(self.buf.dtype), alpha=weight)
        for p in self.params:
            p.grad = None

    def exchange(self, loss_sum: float, computed: bool, launch: Launch) -> list[Any]:
        """Start whatever is left of the step's all-reduce; returns every handle
        to wait for, in order. Raises what a backward hook could not."""
        self._launch = None
        if self._error is not None:
            raise self._error
        if not computed:
            self.buf.zero_()  # no share this step: contribute nothing
        if not self.in_place:
            self.buf[self.n] = loss_sum
            return [launch(self.buf)]
        last = len(self._buckets) - 1
        while self._next < last:
            self._start(self._next, launch)
        lo, _, members = self._buckets[last]
        self._absorb(members)
        if computed and self._weight not in (None, 1.0):
            self.buf[lo : self.n].mul_(self._weight)
        self.buf[self.n] = loss_sum
        self._started.append(launch(self.buf[lo:]))
        self._next = last + 1
        return self._started

    def averaged(self) -> None:
        """After the all-reduce: the averaged gradient into every ``.grad``."""
        if self.in_place:
            return  # the views hold it already
        for p, v in zip(self.params, self.views, strict=True):
            p.grad = v.to(p.dtype, copy=True)

    def failed(self) -> None:
        """The exchange failed: a new buffer. The abandoned collectives are
        parked, not cancelled (elastic/train/group.py), and may still write into
        the old one; nothing of the next step may live there."""
        self._launch = None
        self._alloc()
        if self.in_place:
            for p, v in zip(self.params, self.views, strict=True):
                p.grad = v

    def zero(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Zero the bound gradients of ``params`` in place (the views stay, so
        the next backward accumulates into the buffer again); returns the
        parameters left to the optimizer's own zero_grad."""
        if not self.in_place:
            return params
        rest = []
        for p in params:
            v = self._view_of.get(id(p))
            if v is not None and p.grad is not None and _is_view(p.grad, v):
                v.zero_()
            else:
                rest.append(p)
        return rest

    # -- overlap ----------------------------------------------------------------------

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        # Runs inside autograd's backward: it must not raise, so a failure is
        # kept for exchange() to raise.
        if self._launch is None or self._error is not None:
            return
        if id(p) in self._seen:
            self._error = ConfigError(
                "a gradient was accumulated twice in the last micro-batch of a step (two "
                "backward passes): its bucket was all-reduced after the first. Run one "
                "backward per micro-batch (job.loader(..., micro_batches=K) for "
                "accumulation), or turn overlap off with job.overlap = False"
            )
            return
        self._seen.add(id(p))
        k = self._bucket_of[id(p)]
        self._left[k] -= 1
        last = len(self._buckets) - 1
        while self._next < last and self._left[self._next] == 0:
            try:
                self._start(self._next, self._launch)
            except Exception as exc:  # a WorkerGroupError, raised at the exchange
                self._error = exc
                return

    def _start(self, k: int, launch: Launch) -> None:
        lo, hi, members = self._buckets[k]
        self._absorb(members)
        if self._weight not in (None, 1.0):
            self.buf[lo:hi].mul_(self._weight)
        self._started.append(launch(self.buf[lo:hi]))
        self._next = k + 1

    def _absorb(self, params: list[torch.nn.Parameter]) -> None:
        # A .grad the script replaced holds gradient not yet in the buffer.
        for p in params:
            g, v = p.grad, self._view_of[id(p)]
            if g is not None and not _is_view(g, v):
                v.add_(g)
                p.grad = v


def _is_view(g: torch.Tensor, v: torch.Tensor) -> bool:
    return g.data_ptr() == v.data_ptr() and g.shape == v.shape
