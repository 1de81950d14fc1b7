"""Checks of user input (SPEC section 6): every error names the parameter or hyperparameter and
the fix, and is raised before any state is changed."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .reference import PRESETS

LLACA_GROUP_DEFAULTS: dict[str, Any] = {
    "preset": "coin",
    "scale": None,
    "base_weight": None,
    "llaca": True,
    "ema_dtype": None,
}

_EMA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _finite_nonnegative(name: str, value: Any, where: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"llaca_optim: {name} must be a number or a one-element tensor ({where})")
        if value.device.type != "cpu":
            return  # reading a device tensor would synchronise every step (SPEC section 4)
        value = float(value.item())
    number = value
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise TypeError(f"llaca_optim: {name} must be a number, got {type(value).__name__} ({where})")
    if not math.isfinite(number) or number < 0.0:
        raise ValueError(f"llaca_optim: {name} must be finite and >= 0, got {number} ({where})")


def resolve_llaca_knobs(group: dict[str, Any], where: str) -> tuple[float, float]:
    """Validates a group's LLaCA knobs and returns its ``(scale, base_weight)``, presets applied."""
    preset = group["preset"]
    if preset not in PRESETS:
        raise ValueError(
            f"llaca_optim: unknown preset {preset!r} ({where}); choose one of {sorted(PRESETS)} "
            "or pass scale= and base_weight= explicitly"
        )
    scale = PRESETS[preset].scale if group["scale"] is None else group["scale"]
    base_weight = PRESETS[preset].base_weight if group["base_weight"] is None else group["base_weight"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"llaca_optim: scale must be a finite number > 0, got {scale!r} ({where})")
    if (
        isinstance(base_weight, bool)
        or not isinstance(base_weight, (int, float))
        or not 0.0 < base_weight <= 1.0
    ):
        raise ValueError(
            f"llaca_optim: base_weight must lie in (0, 1], got {base_weight!r} ({where}); it is "
            "the EMA weight used when the adaptive one is out of range"
        )
    if not isinstance(group["llaca"], bool):
        raise TypeError(f"llaca_optim: llaca must be True or False, got {group['llaca']!r} ({where})")
    ema_dtype = group["ema_dtype"]
    if ema_dtype is not None and ema_dtype != "param" and ema_dtype not in _EMA_DTYPES:
        raise ValueError(
            f"llaca_optim: ema_dtype must be None (float32 for 16-bit parameters), 'param' or one "
            f"of {_EMA_DTYPES}, got {ema_dtype!r} ({where})"
        )
    return float(scale), float(base_weight)


def validate_adamw_group(group: dict[str, Any], where: str) -> None:
    if group.get("differentiable", False):
        raise ValueError(
            "llaca_optim: differentiable=True is not supported: the fused kernels update the "
            f"parameters in place outside autograd ({where}); use torch.optim.AdamW("
            "differentiable=True) where the optimizer step must be differentiated")
    for name in ("foreach", "fused"):
        if group.get(name) not in (None, True, False):
            raise TypeError(f"llaca_optim: {name} must be None, True or False, got "
                            f"{group[name]!r} ({where})")
    if not isinstance(group["defer_blend"], bool):
        raise TypeError(
            f"llaca_optim: defer_blend must be True or False, got {group['defer_blend']!r} ({where})"
        )
    _finite_nonnegative("lr", group["lr"], where)
    _finite_nonnegative("eps", group["eps"], where)
    _finite_nonnegative("weight_decay", group["weight_decay"], where)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"llaca_optim: betas must be a pair (beta1, beta2), got {betas!r} ({where})")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.device.type != "cpu":
            continue  # no host synchronisation per step
        value = float(beta.item()) if isinstance(beta, Tensor) else beta
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"llaca_optim: betas[{index}] must lie in [0, 1), got {beta!r} ({where})"
            )


def ema_dtype_for(param: Tensor, ema_dtype: Any) -> torch.dtype:
    """float32 EMA for 16-bit parameters by default (small EMA steps round to zero in 16 bits)."""
    if ema_dtype == "param":
        return param.dtype
    if ema_dtype is None:
        return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype
    return ema_dtype


def param_label(group: dict[str, Any], group_index: int, param_index: int) -> str:
    names = group.get("param_names")
    name = f" {names[param_index]!r}" if names and param_index < len(names) else ""
    return f"parameter{name} (param_groups[{group_index}]['params'][{param_index}])"


def check_gradient(param: Tensor, grad: Tensor, label: str) -> None:
    """The gradient-level errors of SPEC section 6."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(
            f"llaca_optim: {label} has a sparse gradient; LLaCA needs dense gradients "
            "(for nn.Embedding pass sparse=False)"
        )
    if torch.is_complex(param):
        raise RuntimeError(
            f"llaca_optim: {label} is complex; complex parameters are not supported: register "
            "torch.view_as_real(param) as the parameter instead"
        )
    if not param.is_floating_point():
        raise RuntimeError(f"llaca_optim: {label} has dtype {param.dtype}; only floating-point parameters can be optimized")
    if grad.shape != param.shape:
        raise RuntimeError(
            f"llaca_optim: the gradient of {label} has shape {tuple(grad.shape)} but the parameter "
            f"has shape {tuple(param.shape)}; fix whatever wrote .grad"
        )
    if grad.dtype != param.dtype:
        raise RuntimeError(
            f"llaca_optim: the gradient of {label} has dtype {grad.dtype} but the parameter has "
            f"dtype {param.dtype}; cast the gradient (param.grad = param.grad.to(param.dtype))"
        )
    if grad.device != param.device:
        raise RuntimeError(
            f"llaca_optim: the gradient of {label} is on {grad.device} but the parameter is on "
            f"{param.device}; move the gradient to the parameter's device"
        )


# optimizer.state entries. Those made together (a step adds all or none of them); the LLaCA
# entries as a whole, with the deferred-blend flag (see _core.py); the one-element slots with their
# dtype. Every other entry is shaped like its parameter, in its dtype (the EMA: an EMA dtype).
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
LLACA_STATE = ("ema", "prev_grad", "alpha", "alpha_fell_back")
LLACA_STATE_KEYS = (*LLACA_STATE, "ema_pending")
SLOT_DTYPES = {"step": torch.float32, "alpha": torch.float32,
               "alpha_fell_back": torch.bool, "ema_pending": torch.bool}


def check_state(param: Tensor, state: Any, label: str, *, adamw: bool, llaca: bool) -> None:
    """The state a step will use for ``param``, which the user may have edited between steps
    (torch's optimizers read ``optimizer.state`` afresh at every step, and so does ours): each
    entry the step reads must be what the kernels take, checked before any tensor is touched."""
    afresh = "or delete the entry (del optimizer.state[param]) to start this parameter's state afresh"
    if not isinstance(state, dict):
        raise TypeError(f"llaca_optim: optimizer.state[param] of {label} is a "
                        f"{type(state).__name__}, not a dict; put a dict there, {afresh}")
    used = ((ADAMW_STATE + ("max_exp_avg_sq",) if adamw else ())
            + (LLACA_STATE_KEYS if llaca else ()))
    for keys, on in ((ADAMW_STATE, adamw), (LLACA_STATE, llaca)):
        present = [k for k in keys if k in state]
        if on and present and len(present) < len(keys):
            missing = [k for k in keys if k not in state]
            raise RuntimeError(
                f"llaca_optim: optimizer.state of {label} has {present} but not {missing}, which "
                f"come with them; restore those, {afresh}")
    for key in used:
        if key not in state:
            continue  # made by the step (amsgrad turned on, say)
        value = state[key]
        where = f"llaca_optim: optimizer.state[param][{key!r}] of {label}"
        if key in SLOT_DTYPES:
            dtype = SLOT_DTYPES[key]
            if (not isinstance(value, Tensor) or value.numel() != 1 or value.dtype != dtype
                    or value.device != param.device):
                got = (f"{value.numel()} elements of {value.dtype} on {value.device}"
                       if isinstance(value, Tensor) else f"a {type(value).__name__}")
                raise RuntimeError(
                    f"{where} must be a one-element {dtype} tensor on {param.device}, got {got}; "
                    f"put one there (torch.tensor(value, dtype={dtype}, device=param.device)), "
                    f"{afresh}")
            continue
        dtypes = _EMA_DTYPES if key == "ema" else (param.dtype,)
        if (not isinstance(value, Tensor) or value.shape != param.shape
                or value.device != param.device or value.dtype not in dtypes):
            got = (f"shape {tuple(value.shape)}, {value.dtype} on {value.device}"
                   if isinstance(value, Tensor) else f"a {type(value).__name__}")
            want = "one of " + ", ".join(map(str, dtypes)) if key == "ema" else str(param.dtype)
            raise RuntimeError(
                f"{where} must be a tensor of the parameter's shape {tuple(param.shape)} on "
                f"{param.device}, of dtype {want}; got {got}. Put one there, {afresh}")
