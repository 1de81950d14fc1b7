"""The oracle: docs/spec.md section 2 in plain per-tensor PyTorch, written for clarity, never for speed.

Every other backend is tested against these two functions. They work on one tensor at a time, on
any device and any memory layout (they update views in place with ordinary PyTorch ops), and they
can compute in float64 (``compute_dtype=torch.float64``) so that the tests compare the fused fp32
kernels with something more exact than themselves.

The AdamW step is ``torch.optim.AdamW``'s (decoupled weight decay, the single-tensor formula).
The LLaCA update, after that step, for a tensor ``p`` with gradient ``g``::

    if no EMA yet:              ema = copy(p)                   (taken after the inner step)
    if a previous gradient:
        a = sum |p - ema|       (L1 drift of the live weights from their EMA)
        b = sum |g|             (L1 norm of the gradient)
        c = sum |g - g_prev|    (L1 norm of the gradient change)
        alpha = scale * (1 + b) / (a * c);  alpha = base_weight unless 0 < alpha < 1
        (with norms="mean", a, b and c are first divided by the tensor's element count)
    else:
        alpha = base_weight
    ema = ema + alpha * (p - ema);  g_prev = copy(g)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adamw_step_", "alphas_from_sums_", "llaca_update_", "llaca_sums", "blend_",
           "balance_weight"]


def balance_weight(a: float, b: float, c: float, scale: float, base_weight: float) -> tuple[float, bool]:
    """``alpha = scale * (1 + b) / (a * c)``, or ``base_weight`` unless ``0 < alpha < 1``.

    Computed in Python floats (double precision). Division by zero and non-finite sums give
    inf or NaN, which fail the range test and fall back. Returns ``(alpha, fell_back)``.
    """
    denominator = a * c
    if denominator == 0.0 or math.isnan(denominator):
        candidate = math.nan if (1.0 + b) == 0.0 or math.isnan(b) else math.inf
    else:
        candidate = scale * (1.0 + b) / denominator
    if 0.0 < candidate < 1.0:
        return candidate, False
    return base_weight, True


# The horizon rule's constants (NOTE [horizon] in llaca_optim/optim/sharded.py).
HORIZON_WINDOW = 20       # steps: the running mean's memory once it holds that many
HORIZON_ALPHA_MAX = 0.5   # a blend that would move the EMA most of the way to p is capped here


@torch.no_grad()
def alphas_from_sums_(sums: Tensor, elements: Tensor, alpha: Tensor, alpha_fell_back: Tensor,
                      signal_log_mean: Tensor, signal_count: Tensor, pending: Tensor, *,
                      scale: float, base_weight: float, mean_norms: bool, horizon: float = 0.0,
                      found_inf: Tensor | None = None) -> None:
    """:func:`balance_weight` for many tensors at once, from their whole-tensor sums, in place:
    the finish of a sharded step (NOTE [sharded parameters] in optim/sharded.py), the default
    kernel of the ``llaca_alphas_`` op on every backend.

    ``sums``: float64, one ``(a, b, c)`` row per tensor; ``elements``: each tensor's element
    count (float64, for ``mean_norms``). On entry ``alpha`` (float32) holds each tensor's last
    alpha, negative before its first LLaCA step (whose EMA the kernels just set to p: it has no
    blend and falls back); on exit the new alphas (computed in float64, then rounded), with the
    fallback flags in ``alpha_fell_back`` and in ``pending`` the blends left to apply. A non-zero
    ``found_inf`` (AMP overflow: the kernels changed nothing) leaves them all as they were.

    With ``horizon`` > 0, alpha follows the horizon's rule instead (NOTE [horizon] in
    llaca_optim/optim/sharded.py; ``scale`` and ``mean_norms`` do not enter it and
    ``base_weight`` is 1 / horizon), reading and updating ``signal_log_mean`` and
    ``signal_count`` (float64, one element per tensor; empty tensors without a horizon)."""
    fresh = alpha < 0
    if mean_norms:
        sums = sums / elements.unsqueeze(1)
    a, b, c = sums.unbind(1)
    updates = []
    if horizon > 0:
        signal = (1.0 + b) / (a * c)
        adaptive = torch.isfinite(signal) & (signal > 0) & ~fresh
        log_signal = torch.where(adaptive, signal, 1.0).log()
        count = signal_count + adaptive.to(torch.float64)
        memory = count.clamp(min=1.0, max=HORIZON_WINDOW)
        log_mean = torch.where(adaptive, signal_log_mean + (log_signal - signal_log_mean) / memory,
                               signal_log_mean)
        candidate = ((log_signal - log_mean).exp() / horizon).clamp(max=HORIZON_ALPHA_MAX)
        updates = [(signal_log_mean, log_mean), (signal_count, count)]
    else:
        candidate = scale * (1.0 + b) / (a * c)
        adaptive = (candidate > 0) & (candidate < 1) & ~fresh
    new_alpha = torch.where(adaptive, candidate, base_weight)
    updates = [(alpha, new_alpha), (alpha_fell_back, ~adaptive), (pending, ~fresh), *updates]
    skipped = None if found_inf is None else found_inf.to(device=sums.device) != 0
    for old, new in updates:
        old.copy_(new if skipped is None else torch.where(skipped, old.to(new.dtype), new))


def _l1(x: Tensor) -> float:
    """sum |x| over the whole tensor, in float64. The sum of a DTensor (a sharded parameter) is a
    partial sum per rank until reduced, and ``float()`` would read this rank's part alone."""
    total = x.abs().sum(dtype=torch.float64)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One ``torch.optim.AdamW`` step on one tensor, in place; returns the (unscaled) gradient
    in ``compute_dtype`` that the LLaCA update should see.

    State tensors keep their storage dtype; the arithmetic runs in ``compute_dtype``.
    """
    g = grad.to(compute_dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=compute_dtype)
    g_adam = -g if maximize else g

    step.add_(1)
    t = float(step)
    p = param.to(compute_dtype)
    m = exp_avg.to(compute_dtype)
    v = exp_avg_sq.to(compute_dtype)

    # torch.optim.AdamW's for-loop implementation, op for op: in fp32 the two agree bit for bit.
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g_adam, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g_adam, g_adam, value=1.0 - beta2)
    step_size = lr / (1.0 - beta1**t)
    bias_correction2_sqrt = (1.0 - beta2**t) ** 0.5
    if amsgrad:
        assert max_exp_avg_sq is not None
        v_max = torch.maximum(max_exp_avg_sq.to(compute_dtype), v)
        max_exp_avg_sq.copy_(v_max)
        denom = v_max.sqrt() / bias_correction2_sqrt + eps
    else:
        denom = v.sqrt() / bias_correction2_sqrt + eps
    p.addcdiv_(m, denom, value=-step_size)

    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return g


def llaca_update_(
    param: Tensor,
    grad: Tensor,
    ema: Tensor,
    prev_grad: Tensor,
    *,
    fresh: bool,
    scale: float,
    base_weight: float,
    mean_norms: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[float, bool]:
    """The LLaCA update of one tensor after its inner optimizer step, in place.

    ``grad`` is the gradient the optimizer saw (unscaled, any dtype); ``fresh`` says that the
    tensor has no EMA and no previous gradient yet (its first LLaCA step), in which case ``ema``
    and ``prev_grad`` are only storage to fill. ``mean_norms`` divides the three sums by the
    tensor's element count (``norms="mean"``). Returns ``(alpha, fell_back)``.
    """
    p = param.detach().to(compute_dtype)
    g = grad.detach().to(compute_dtype)
    if fresh:
        ema.copy_(p)
        alpha, fell_back = base_weight, True
    else:
        # An empty tensor's sums are 0: it falls back whatever they are divided by.
        elements = float(max(param.numel(), 1)) if mean_norms else 1.0
        a, b, c = llaca_sums(p, g, ema, prev_grad, compute_dtype)
        alpha, fell_back = balance_weight(a / elements, b / elements, c / elements, scale,
                                          base_weight)
        blend_(param, ema, alpha, compute_dtype)
    prev_grad.copy_(g)
    return alpha, fell_back


def llaca_sums(param: Tensor, grad: Tensor, ema: Tensor, prev_grad: Tensor,
               compute_dtype: torch.dtype = torch.float32) -> tuple[float, float, float]:
    """``(sum |p - ema|, sum |g|, sum |g - g_prev|)`` of one tensor (or of one piece of a tensor,
    whose partial sums the sharded modes add up across ranks), in float64 whatever
    ``compute_dtype`` is: this is the oracle."""
    p = param.detach().to(compute_dtype)
    g = grad.detach().to(compute_dtype)
    return (_l1(p - ema.to(compute_dtype)), _l1(g), _l1(g - prev_grad.to(compute_dtype)))


def blend_(param: Tensor, ema: Tensor, alpha: float, compute_dtype: torch.dtype = torch.float32) -> None:
    """``ema += alpha * (p - ema)``, in place."""
    p = param.detach().to(compute_dtype)
    e = ema.to(compute_dtype)
    ema.copy_(e + alpha * (p - e))
