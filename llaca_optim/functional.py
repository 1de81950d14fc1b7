"""The functional API: one fused AdamW + LLaCA step over lists of tensors, as ``torch.optim``'s
``adamw()`` is to ``AdamW``.

    state = [functional.new_state(p) for p in params]
    ...
    functional.adamw_llaca(params, [p.grad for p in params],
                           *functional.state_lists(state), lr=1e-3)

Each call is one op call, ``torch.ops.llaca_optim.adamw_llaca_`` (or ``llaca_update_``), whose
kernel the dispatcher picks by the tensors' device: the extension's CPU or CUDA kernel where it
is built, else the reference (``llaca_optim.reference``). ``backend=`` names another
(``"reference"``, ``"triton"``...). The tensors of one call share a device and a dtype (their
EMAs may be float32 for 16-bit parameters); the state lists are updated in place. Every blend is
applied within the call: deferring blends is the optimizers' business (they know when an EMA is
read).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .ops import library
from .ops.registry import Backend, resolve_backend
from .ops.roles import (ADAMW_LLACA, LLACA_FLUSH, LLACA_UPDATE, MADE_ORDER, Bucket, StepHyper,
                        op_lists, roles_of)
from .optim import validation
from .presets import Preset

__all__ = ["adamw_llaca", "llaca_update", "new_state", "state_lists", "step_bucket"]


def new_state(param: Tensor, *, amsgrad: bool = False, llaca: bool = True,
              ema_dtype: Any = None) -> dict[str, Tensor]:
    """A parameter's state before its first step, as ``LLaCAAdamW`` makes it (its keys are
    ``optimizer.state[param]``'s; ``ema_dtype`` as LLaCAAdamW's)."""
    validation.check_ema_dtype(ema_dtype, "functional arguments")
    parts = {"adamw"} | ({"amsgrad"} if amsgrad else set()) | ({"llaca"} if llaca else set())
    dtype = validation.ema_dtype_for(param, ema_dtype)
    with torch.no_grad():
        return {r.state_key: r.new_entry(param, dtype) for r in MADE_ORDER if r.part in parts}


def state_lists(states: list[dict[str, Tensor]]) -> list[list[Tensor]]:
    """The state lists of :func:`adamw_llaca`, in its argument order, from :func:`new_state`'s
    dicts (a list is empty where the dicts lack its entry: amsgrad or LLaCA off)."""
    roles = [r for r in roles_of(ADAMW_LLACA) if r.state_key is not None and r.part != "deferral"]
    return [[s[r.state_key] for s in states if r.state_key in s] for r in roles]


# "auto": the main namespace, whose kernel the dispatcher picks by the tensors' device.
_DISPATCHER = Backend("auto", library.define(library.NAMESPACE))


def _backend(backend: str | Backend, params: list[Tensor]) -> Backend:
    if backend == "auto" or not params:
        return _DISPATCHER
    return resolve_backend(backend, params[0].device.type)


def step_bucket(backend: Backend, bucket: Bucket, hyper: StepHyper, op: str) -> None:
    """One call of ``op`` (``adamw_llaca_``, ``llaca_update_`` or ``llaca_flush_``) over a
    bucket's lists, with the step's hyperparameters: the one place where the ops' arguments are
    built. The optimizers' steps run it per bucket (optim/plan.py), after checking everything
    once per plan; :func:`adamw_llaca` and :func:`llaca_update` run it after checking their
    arguments. A sharded bucket's kernels write their local sums into its ``shard.sums``."""
    lists = op_lists(bucket, op)
    if op == LLACA_FLUSH:
        backend.call(op, lists)
        return
    sums = bucket.shard.sums if bucket.shard is not None else None
    common = dict(scale=hyper.scale, base_weight=hyper.base_weight, mean_norms=hyper.mean_norms,
                  grad_scale=hyper.grad_scale, found_inf=hyper.found_inf, shard_sums=sums)
    if op == LLACA_UPDATE:
        backend.call(op, lists, **common)
        return
    lr_tensor = hyper.lr if isinstance(hyper.lr, Tensor) else None
    backend.call(op, lists, lr=0.0 if lr_tensor is not None else float(hyper.lr), lr_tensor=lr_tensor,
                 beta1=hyper.beta1, beta2=hyper.beta2, weight_decay=hyper.weight_decay,
                 eps=hyper.eps, amsgrad=hyper.amsgrad, maximize=hyper.maximize, llaca=hyper.llaca,
                 **common)


def _knobs(preset: str, scale: float | None, base_weight: float | None,
           norms: str | None) -> Preset:
    return validation.resolve_llaca_knobs(
        dict(preset=preset, scale=scale, base_weight=base_weight, norms=norms, llaca=True,
             ema_dtype=None),
        "functional arguments")


def _check_lengths(**lists: list[Tensor]) -> None:
    n = len(lists["params"])
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"llaca_optim: {name} has {len(values)} tensors but params has {n}; "
                             "pass one per parameter (amsgrad's and LLaCA's lists may be empty "
                             "when those are off)")


@torch.no_grad()
def adamw_llaca(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                state_steps: list[Tensor], emas: list[Tensor], prev_grads: list[Tensor],
                alphas: list[Tensor], alpha_fell_backs: list[Tensor], *, lr: float | Tensor = 1e-3,
                beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 1e-2,
                eps: float = 1e-8, amsgrad: bool = False, maximize: bool = False,
                llaca: bool = True, preset: str = "coin", scale: float | None = None,
                base_weight: float | None = None, norms: str | None = None,
                grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                backend: str | Backend = "auto") -> None:
    """One ``torch.optim.AdamW`` step of every tensor, then (``llaca``) its LLaCA update: the
    balance weight from the gradient, its change and the drift from the EMA, then the EMA blend
    (docs/spec.md section 2). ``alphas`` holds -1 for a tensor with no LLaCA step yet; the call
    writes each tensor's alpha there and whether it fell back to ``base_weight`` into
    ``alpha_fell_backs``. ``grad_scale`` and ``found_inf`` are GradScaler's (the gradients are
    divided by the scale; a non-zero ``found_inf`` skips the whole step)."""
    _check_lengths(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                   state_steps=state_steps,
                   **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}),
                   **(dict(emas=emas, prev_grads=prev_grads, alphas=alphas,
                           alpha_fell_backs=alpha_fell_backs) if llaca else {}))
    balance = _knobs(preset, scale, base_weight, norms)
    bucket = Bucket(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                    max_exp_avg_sqs=max_exp_avg_sqs, state_steps=state_steps, emas=emas,
                    prev_grads=prev_grads, alphas=alphas, alpha_fell_backs=alpha_fell_backs)
    hyper = StepHyper(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                      amsgrad=amsgrad, maximize=maximize, llaca=llaca, scale=balance.scale,
                      base_weight=balance.base_weight, mean_norms=balance.mean_norms,
                      grad_scale=grad_scale, found_inf=found_inf)
    step_bucket(_backend(backend, params), bucket, hyper, ADAMW_LLACA)


@torch.no_grad()
def llaca_update(params: list[Tensor], grads: list[Tensor], emas: list[Tensor],
                 prev_grads: list[Tensor], alphas: list[Tensor], alpha_fell_backs: list[Tensor], *,
                 preset: str = "coin", scale: float | None = None,
                 base_weight: float | None = None, norms: str | None = None,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                 backend: str | Backend = "auto") -> None:
    """The LLaCA update alone, after any other optimizer's step of ``params`` (arguments as in
    :func:`adamw_llaca`)."""
    _check_lengths(**dict(zip((r.arg for r in roles_of(LLACA_UPDATE)),
                              (params, grads, emas, prev_grads, alphas, alpha_fell_backs))))
    balance = _knobs(preset, scale, base_weight, norms)
    bucket = Bucket(params=params, grads=grads, emas=emas, prev_grads=prev_grads, alphas=alphas,
                    alpha_fell_backs=alpha_fell_backs)
    hyper = StepHyper(scale=balance.scale, base_weight=balance.base_weight,
                      mean_norms=balance.mean_norms, grad_scale=grad_scale, found_inf=found_inf)
    step_bucket(_backend(backend, params), bucket, hyper, LLACA_UPDATE)
