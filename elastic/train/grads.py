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

Exact (``exact=True``): each micro-batch's gradient is added in float64, where
a sum of a few float32 values is exact, so the update does not depend on how
micro-batches are spread over ranks. It copies per micro-batch; it is the mode
for bitwise reproducibility, not for speed.

Parameters of different dtypes, or a ``.grad`` the script replaced (a
``zero_grad(set_to_none=True)`` on the raw optimizer or the module), fall back
to copying that gradient in; the result is the same.
"""

from __future__ import annotations

import torch


class StepGradients:
    def __init__(
        self, params: list[torch.nn.Parameter], *, exact: bool, device: torch.device
    ) -> None:
        self.params = params
        self.n = sum(p.numel() for p in params)
        dtypes = {p.dtype for p in params}
        self.in_place = not exact and len(dtypes) == 1
        self.dtype = torch.float64 if exact else params[0].dtype
        self.device = device
        self._alloc()

    def _alloc(self) -> None:
        # One slot more: the step's loss sum rides on the same all-reduce.
        self.buf = torch.zeros(self.n + 1, dtype=self.dtype, device=self.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.buf[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._weight: float | None = None  # in place: the weight the running sum is kept at

    # -- one step -------------------------------------------------------------------

    def begin(self) -> None:
        """A step starts: in place, point every ``.grad`` at the buffer."""
        self._weight = None
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
        self._absorb()
        if self._weight is None:
            self._weight = weight
        elif weight != self._weight:
            # Keep the invariant buf = sum_j (w_j / w_cur) g_j before the
            # micro-batch's backward adds its own g_cur.
            self.buf[: self.n].mul_(self._weight / weight)
            self._weight = weight

    def fold(self, weight: float) -> None:
        """The micro-batch just computed, of share ``weight``, joins the sum."""
        if self.in_place:
            self._absorb()  # autograd added it already
            return
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params
        ]
        self.buf[: self.n].add_(torch.cat(grads).to(self.buf.dtype), alpha=weight)
        for p in self.params:
            p.grad = None

    def finish(self, loss_sum: float, computed: bool) -> torch.Tensor:
        """The buffer to all-reduce: this rank's weighted sum and its loss sum."""
        if not computed:
            self.buf.zero_()  # no share this step: contribute nothing
        elif self.in_place:
            self._absorb()
            if self._weight is not None and self._weight != 1.0:
                self.buf[: self.n].mul_(self._weight)
        self.buf[self.n] = loss_sum
        return self.buf

    def averaged(self) -> None:
        """After the all-reduce: the averaged gradient into every ``.grad``."""
        if self.in_place:
            return  # the views hold it already
        for p, v in zip(self.params, self.views, strict=True):
            p.grad = v.to(p.dtype, copy=True)

    def failed(self) -> None:
        """The exchange failed: a new buffer. The abandoned collective is parked,
        not cancelled (elastic/train/group.py), and may still write into the
        old one; nothing of the next step may live there."""
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
        bound = {id(p): v for p, v in zip(self.params, self.views, strict=True)}
        rest = []
        for p in params:
            v = bound.get(id(p))
            if v is not None and p.grad is not None and _is_view(p.grad, v):
                v.zero_()
            else:
                rest.append(p)
        return rest

    def _absorb(self) -> None:
        # A .grad the script replaced holds gradient not yet in the buffer.
        for p, v in zip(self.params, self.views, strict=True):
            g = p.grad
            if g is not None and not _is_view(g, v):
                v.add_(g)
                p.grad = v


def _is_view(g: torch.Tensor, v: torch.Tensor) -> bool:
    return g.data_ptr() == v.data_ptr() and g.shape == v.shape
