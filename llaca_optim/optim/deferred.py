"""Blends left pending: the host's side of the deferred EMA blend.

NOTE [deferred blend]
A backend with ``defers_blend`` (CUDA, CPU, Triton) may leave a step's EMA blend pending until
the tensor's next step, which then costs one pass over memory instead of two: that step reads p
and the EMA anyway, applies the pending blend first, and leaves its own pending (the kernels'
side: NOTE [CUDA deferred blend] in csrc/cuda/kernel_args.h, NOTE [CPU deferred blend] in
csrc/cpu/llaca_cpu.cpp, ops/triton/kernels.py). Whether a bucket defers is decided once, when the
step planner builds it (optim/plan.py): only tensors a deferring bucket holds get an
``ema_pending`` flag in their state. While a blend is pending the EMA in ``state`` lags one
blend behind, so everything that reads EMAs flushes first; the flags are device tensors, so
neither deferring nor flushing synchronises with the host. :class:`PendingBlends` keeps the
host's conservative view (a deferring step ran since the last flush), which keeps a flush free
when nothing can be pending. A step captured in a CUDA graph defers at every replay, unseen by
Python: once one was captured, every flush runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..functional import step_bucket
from ..ops.registry import BackendChoice
from ..ops.roles import LLACA_FLUSH, Bucket, StepHyper
from . import sharded


def capturing(t: Tensor) -> bool:
    """Whether a CUDA graph capture is under way on ``t``'s device's current stream."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class PendingBlends:
    """Which blends may be pending, and the flushes that apply them through the backend of each
    device type (``backends``, the optimizer's choice: the one that deferred)."""

    def __init__(self, backends: BackendChoice) -> None:
        self.backends = backends
        self.pending = False       # a deferring step ran since the last full flush
        self.captured = False      # a deferring step was captured in a CUDA graph
        self._warned_inplace = False

    def may_be_pending(self) -> bool:
        return self.pending or self.captured

    @torch.no_grad()
    def flush(self, entries: Iterable[tuple[Tensor, dict[str, Any] | None]], drop: bool) -> None:
        """Applies the pending blends of ``entries`` (parameter, its state) through the backend
        that deferred them, one call per (device, dtype, EMA dtype); ``drop`` also removes their
        flags from the state."""
        buckets: dict[tuple[Any, ...], Any] = {}
        for p, state in entries:
            if state is None or "ema_pending" not in state:
                continue
            bucket = buckets.setdefault((p.device, p.dtype, state["ema"].dtype), Bucket())
            bucket.params.append(sharded.local(p))
            bucket.emas.append(sharded.local(state["ema"]))
            bucket.alphas.append(state["alpha"])
            bucket.ema_pending.append(state.pop("ema_pending") if drop else state["ema_pending"])
        for (device, _, _), bucket in buckets.items():
            step_bucket(self.backends(device.type), bucket, StepHyper(), LLACA_FLUSH)

    def flush_all(self, entries: Iterable[tuple[Tensor, dict[str, Any] | None]]) -> None:
        """Applies every pending blend (``entries``: all parameters with LLaCA state); free when
        nothing can be pending."""
        if self.may_be_pending():
            self.flush(entries, drop=False)
            self.pending = False

    def before_step(self, bucket: Any) -> None:
        """Marks blends as pending, and warns (once) if a parameter whose blend is pending was
        changed in place since its last step: the blend then uses the changed values. A step of
        ours does not bump ``_version`` (the kernels write through the op), so any change is the
        user's."""
        if bucket.params and capturing(bucket.params[0]):
            self.captured = True
        versions = [p._version for p in bucket.params]
        if (self.pending and bucket.param_versions is not None
                and versions != bucket.param_versions and not self._warned_inplace):
            self._warned_inplace = True
            warnings.warn(
                "llaca_optim: parameters were changed in place since the last optimizer step, "
                "while that step's EMA blend was deferred to this one (defer_blend=True); the "
                "blend used the changed values. Call optimizer.flush_ema() before changing "
                "parameters between steps, or build the optimizer with defer_blend=False.",
                RuntimeWarning,
                stacklevel=4,
            )
        bucket.param_versions = versions
        self.pending = True
