"""The reference kernels: the ops' lists walked tensor by tensor through ``llaca_optim.reference``.

They are the ops' default kernels (``torch.ops.llaca_optim.*`` on a device without a native
kernel, and everywhere when the extension is not built) and the kernels of the
``llaca_optim_reference`` namespace (the ``reference`` backend); ``llaca_optim_reference_float64``
computes in float64, the tests' high-precision oracle. They take any device, dtype and memory
layout, and read ``found_inf`` and the fresh marks on the host.

Only whole DTensors (a sharded parameter whose shards the native kernels do not take) call these
functions directly instead of through an op: a DTensor dispatches an op by its sharding rules,
and these ops have none; the reference computes on them as on any tensor, reducing its sums
across the shards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import reference
from . import library
from .roles import ADAMW_LLACA, LLACA_FLUSH, LLACA_UPDATE

NAMESPACE = "llaca_optim_reference"


def _compute_dtype(param: Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    # float64 parameters compute in float64, as torch.optim.AdamW does.
    return torch.float64 if param.dtype == torch.float64 else compute_dtype


def _overflowed(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _llaca(i: int, params, grad, emas, prev_grads, alphas, alpha_fell_backs, scale, base_weight,
           mean_norms, compute_dtype, shard_sums=None) -> None:
    fresh = bool(alphas[i].item() < 0)
    dtype = _compute_dtype(params[i], compute_dtype)
    if shard_sums is not None:  # the sharded mode: this piece's sums, no alpha, no blend
        if fresh:
            emas[i].copy_(params[i].detach().to(dtype))
        else:
            shard_sums[i].copy_(torch.tensor(
                reference.llaca_sums(params[i], grad, emas[i], prev_grads[i], dtype),
                dtype=torch.float64))
        prev_grads[i].copy_(grad)
        return
    alpha, fell = reference.llaca_update_(
        params[i], grad, emas[i], prev_grads[i], fresh=fresh, scale=scale,
        base_weight=base_weight, mean_norms=mean_norms, compute_dtype=dtype)
    alphas[i].fill_(alpha)
    alpha_fell_backs[i].fill_(fell)


def kernels(compute_dtype: torch.dtype = torch.float32) -> dict[str, Callable[..., None]]:
    """The three ops' reference kernels, computing in ``compute_dtype``."""

    def adamw_llaca_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, emas,
                     prev_grads, alphas, alpha_fell_backs, ema_pending, *, lr, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, llaca, scale, base_weight,
                     mean_norms=False, lr_tensor=None, grad_scale=None, found_inf=None, shard_sums=None) -> None:
        if _overflowed(found_inf):
            return
        lr = float(lr_tensor) if lr_tensor is not None else lr
        with torch.no_grad():
            for i, param in enumerate(params):
                grad = reference.adamw_step_(
                    param, grads[i], exp_avgs[i], exp_avg_sqs[i],
                    max_exp_avg_sqs[i] if amsgrad else None, state_steps[i], lr=lr, beta1=beta1,
                    beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                    maximize=maximize, grad_scale=grad_scale,
                    compute_dtype=_compute_dtype(param, compute_dtype))
                if llaca:
                    _llaca(i, params, grad, emas, prev_grads, alphas, alpha_fell_backs, scale,
                           base_weight, mean_norms, compute_dtype, shard_sums)

    def llaca_update_(params, grads, emas, prev_grads, alphas, alpha_fell_backs, *, scale,
                      base_weight, mean_norms=False, grad_scale=None, found_inf=None, shard_sums=None) -> None:
        if _overflowed(found_inf):
            return
        with torch.no_grad():
            for i, param in enumerate(params):
                grad = grads[i].to(_compute_dtype(param, compute_dtype))
                if grad_scale is not None:
                    grad = grad / grad_scale.to(device=grad.device, dtype=grad.dtype)
                _llaca(i, params, grad, emas, prev_grads, alphas, alpha_fell_backs, scale,
                       base_weight, mean_norms, compute_dtype, shard_sums)

    def llaca_flush_(params, emas, alphas, ema_pending) -> None:
        # The reference never defers a blend itself; what it finds pending is a sharded step's.
        with torch.no_grad():
            for i, flag in enumerate(ema_pending):
                if bool(flag):
                    reference.blend_(params[i], emas[i], float(alphas[i]),
                                     _compute_dtype(params[i], compute_dtype))
                    flag.fill_(False)

    return {ADAMW_LLACA: adamw_llaca_, LLACA_UPDATE: llaca_update_, LLACA_FLUSH: llaca_flush_}


def namespace_for(compute_dtype: torch.dtype) -> str:
    return NAMESPACE if compute_dtype == torch.float32 else f"{NAMESPACE}_{str(compute_dtype)[6:]}"


def ops_for(compute_dtype: torch.dtype = torch.float32):
    """The op namespace whose kernels are the reference computing in ``compute_dtype``."""
    return library.implement(namespace_for(compute_dtype), kernels(compute_dtype))


DEFAULT_KERNELS = kernels(torch.float32)

# The default kernels of torch.ops.llaca_optim: the reference wherever no native kernel is
# registered for the tensors' device.
library.implement(library.NAMESPACE, DEFAULT_KERNELS)
