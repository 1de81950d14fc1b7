"""Checks of user input (docs/spec.md section 6): every error names the parameter or hyperparameter and
the fix, and is raised before any state is changed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..ops import roles
from ..ops.registry import is_dense
from ..presets import NORMS, PRESETS, Preset

LLACA_GROUP_DEFAULTS: dict[str, Any] = {
    "preset": "coin",
    "scale": None,
    "base_weight": None,
    "norms": None,
    "horizon": None,
    "llaca": True,
    "ema_dtype": None,
}

_EMA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _finite_nonnegative(name: str, value: Any, where: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"llaca_optim: {name} must be a number or a one-element tensor ({where})")
        if value.device.type != "cpu":
            return  # reading a device tensor would synchronise every step (docs/spec.md section 4)
        value = float(value.item())
    number = value
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise TypeError(f"llaca_optim: {name} must be a number, got {type(value).__name__} ({where})")
    if not math.isfinite(number) or number < 0.0:
        raise ValueError(f"llaca_optim: {name} must be finite and >= 0, got {number} ({where})")


def resolve_llaca_knobs(group: dict[str, Any], where: str) -> Preset:
    """Validates a group's LLaCA knobs and returns its balance weight's setting, the preset's
    values in place of the knobs left None."""
    preset = group["preset"]
    if preset not in PRESETS:
        raise ValueError(
            f"llaca_optim: unknown preset {preset!r} ({where}); choose one of {sorted(PRESETS)} "
            "or pass scale=, base_weight= and norms= explicitly"
        )
    scale = PRESETS[preset].scale if group["scale"] is None else group["scale"]
    base_weight = PRESETS[preset].base_weight if group["base_weight"] is None else group["base_weight"]
    norms = PRESETS[preset].norms if group.get("norms") is None else group["norms"]
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
    if norms not in NORMS:
        raise ValueError(
            f"llaca_optim: norms must be 'sum' (the published L1 sums) or 'mean' (L1 means, "
            f"independent of the tensor's size), got {norms!r} ({where})")
    if not isinstance(group["llaca"], bool):
        raise TypeError(f"llaca_optim: llaca must be True or False, got {group['llaca']!r} ({where})")
    check_ema_dtype(group["ema_dtype"], where)
    horizon = group.get("horizon")
    if horizon is None:
        return Preset(scale=float(scale), base_weight=float(base_weight), norms=norms)
    if (isinstance(horizon, bool) or not isinstance(horizon, (int, float))
            or not math.isfinite(horizon) or horizon < 1):
        raise ValueError(
            f"llaca_optim: horizon must be a finite number of steps >= 1, got {horizon!r} "
            f"({where}); it is the EMA's time constant: alpha is calibrated to about 1/horizon")
    explicit = [k for k in ("scale", "base_weight", "norms") if group.get(k) is not None]
    if explicit:
        raise ValueError(
            f"llaca_optim: horizon={horizon!r} sets the balance weight's level itself, so "
            f"{' and '.join(explicit)} would be ignored ({where}); pass horizon alone, or drop it "
            "and set the level with scale")
    return Preset(scale=1.0, base_weight=1.0 / float(horizon), norms="sum", horizon=float(horizon))


def check_ema_dtype(ema_dtype: Any, where: str) -> None:
    """``ema_dtype`` as every entry point takes it: None, ``"param"`` or a floating torch dtype."""
    if ema_dtype is None or (isinstance(ema_dtype, str) and ema_dtype == "param"):
        return
    if isinstance(ema_dtype, torch.dtype) and ema_dtype in _EMA_DTYPES:
        return
    hint = ""
    if isinstance(ema_dtype, str) and isinstance(getattr(torch, ema_dtype, None), torch.dtype):
        hint = f" (a string is not a dtype: pass torch.{ema_dtype})"
    raise ValueError(
        f"llaca_optim: ema_dtype must be None (float32 for 16-bit parameters), 'param' or one "
        f"of {_EMA_DTYPES}, got {ema_dtype!r} ({where}){hint}"
    )


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
    """The gradient-level errors of docs/spec.md section 6."""
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


# The entry a state dict taken inside ``ema_weights()`` adds: the live weights, which the
# parameter does not hold while its EMA is swapped in (NOTE [state dicts inside the EMA swap] in
# base.py). Loading puts them back into the parameter; the state never keeps them.
LIVE_PARAM = "live_param"
# The group options an AdamW step reads that no default can stand in for when a loaded group
# lacks them (the others take their defaults, as torch.optim.AdamW's loader gives them).
ADAMW_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")


def check_group_keys(group: dict[str, Any], keys: tuple[str, ...], where: str,
                     saved_by: str = "LLaCAAdamW or torch.optim.AdamW") -> None:
    """Raises unless ``group`` has every key in ``keys`` (a loaded group lacking ``lr`` would
    otherwise fail at the next step with a bare KeyError)."""
    missing = [key for key in keys if key not in group]
    if missing:
        raise ValueError(
            f"llaca_optim: {where} has no {', '.join(map(repr, missing))}, which every param "
            f"group saved by {saved_by} holds: load a state dict that it saved, or add the "
            "missing options to that param group; nothing was loaded")


class StateSource:
    """Where state entries come from, for the words of an error: the optimizer's own state
    (which the user may have edited between steps) or a state dict being loaded. ``entry`` and
    ``item`` name a parameter's entry and one of its keys (formatted with ``label`` and ``key``);
    ``fix`` says what to do."""

    def __init__(self, entry: str, item: str, fix: str) -> None:
        self.entry, self.item, self.fix = entry, item, fix


OWN_STATE = StateSource(
    "optimizer.state[param] of {label}", "optimizer.state[param][{key!r}] of {label}",
    "put that right, or delete the entry (del optimizer.state[param]) to start this parameter's "
    "state afresh")


def loaded_state(owner: str, pid: Any) -> StateSource:
    """A state dict's entry of saved id ``pid``, being loaded into ``owner``."""
    return StateSource(
        f"state_dict['state'][{pid!r}] of the state dict ({owner}), for {{label}},",
        f"state_dict['state'][{pid!r}][{{key!r}}] of the state dict ({owner}), for {{label}},",
        f"fix or drop state_dict['state'][{pid!r}] before loading; nothing was loaded")


def check_state(param: Tensor, state: Any, label: str, *, adamw: bool, llaca: bool,
                source: StateSource = OWN_STATE, slots: int = 1) -> None:
    """The state a step will use for ``param``: what the user may have put into
    ``optimizer.state`` between steps (torch's optimizers read it afresh at every step, and so
    does ours), or what a state dict is loading. Each entry the step reads must be what the
    kernels take, checked before any tensor is touched. ``slots``: the elements of each
    per-tensor slot (``step``, ``alpha``...), one per tensor of a DeepSpeed ZeRO partition
    (NOTE [ZeRO partitions] in optim/zero.py), else one."""
    entry = source.entry.format(label=label)
    if not isinstance(state, dict):
        raise TypeError(f"llaca_optim: {entry} is a {type(state).__name__}, not a dict; "
                        f"{source.fix}")
    used = ((roles.state_keys("adamw", "amsgrad") if adamw else ())
            + (roles.LLACA_STATE_KEYS if llaca else ()))
    for keys, on in ((roles.ADAMW_STATE, adamw), (roles.LLACA_STATE, llaca)):
        present = [k for k in keys if k in state]
        if on and present and len(present) < len(keys):
            missing = [k for k in keys if k not in state]
            raise RuntimeError(
                f"llaca_optim: {entry} has {present} but not {missing}, which come with them; "
                f"{source.fix}")
    for key in used:
        if key not in state:
            continue  # made by the step (amsgrad turned on, say)
        value = state[key]
        where = f"llaca_optim: {source.item.format(key=key, label=label)}"
        if key in roles.SLOT_DTYPES:
            dtype = roles.SLOT_DTYPES[key]
            if (not isinstance(value, Tensor) or value.numel() != slots or value.dtype != dtype
                    or value.device != param.device or (slots > 1 and value.dim() != 1)):
                got = (f"{value.numel()} elements of {value.dtype} on {value.device}"
                       if isinstance(value, Tensor) else f"a {type(value).__name__}")
                want = ("a one-element" if slots == 1 else
                        f"a {slots}-element (one per tensor of its ZeRO partition)")
                raise RuntimeError(
                    f"{where} must be {want} {dtype} tensor on {param.device}, got {got} "
                    f"(torch.tensor(value, dtype={dtype}, device=param.device) makes one); "
                    f"{source.fix}")
            continue
        # The role's dtype rule: an EMA dtype may differ from the parameter's, within limits.
        role = roles.BY_STATE_KEY[key]
        dtypes = _EMA_DTYPES if role.dtype == "ema" else (role.dtype_for(param, param.dtype),)
        if (not isinstance(value, Tensor) or value.shape != param.shape
                or value.device != param.device or value.dtype not in dtypes):
            got = (f"shape {tuple(value.shape)}, {value.dtype} on {value.device}"
                   if isinstance(value, Tensor) else f"a {type(value).__name__}")
            want = "one of " + ", ".join(map(str, dtypes)) if len(dtypes) > 1 else str(dtypes[0])
            raise RuntimeError(
                f"{where} must be a tensor of the parameter's shape {tuple(param.shape)} on "
                f"{param.device}, of dtype {want}; got {got}; {source.fix}")


def check_each_param_once(groups: list[dict[str, Any]]) -> None:
    """Raises if one tensor stands twice in the param groups. torch's optimizers warn and step it
    twice; the fused kernels would update it from several threads at once, a different result
    on every run, so it is refused, as torch plans to refuse it too."""
    seen: dict[int, tuple[int, int]] = {}
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            first = seen.setdefault(id(p), (gi, pi))
            if first != (gi, pi):
                raise ValueError(
                    f"llaca_optim: {param_label(group, gi, pi)} is the same tensor as "
                    f"{param_label(groups[first[0]], *first)}; pass each parameter once (a "
                    "parameter listed twice would be stepped twice per step)")


def check_no_shared_memory(items: list[tuple[Tensor, str, Any, bool]],
                           describe: Callable[[Any], str]) -> None:
    """Raises if a tensor the step writes shares memory with another tensor of the step.

    ``items`` holds ``(tensor, what, owner, written)``: the tensor, what it is ("the parameter",
    "its gradient", a state key), whose it is (``describe(owner)`` names the parameter), and
    whether the step writes it. Two tensors that share memory would be read and written through
    each other, by several threads in the fused kernels (a race), so no written tensor may
    overlap another; read-only tensors (gradients) may overlap each other. Only dense tensors
    are compared, whose elements span exactly one block of memory: those with gaps go to the
    reference backend, one at a time. One sort of the tensors' address ranges, made whenever the
    step is planned anew (a first step, a changed state or layout), not at every step."""
    spans = []
    for tensor, what, owner, written in items:
        numel = tensor.numel()
        if not numel or tensor.is_meta or not (tensor.is_contiguous() or is_dense(tensor)):
            continue  # is_contiguous first: it is the cheaper test and the usual answer
        start = tensor.data_ptr()
        spans.append((tensor.get_device(), start, start + numel * tensor.element_size(), written,
                      what, owner))
    spans.sort(key=lambda s: (s[0], s[1]))
    widest = widest_written = None  # the spans reaching furthest so far, on this device
    for span in spans:
        if widest is not None and widest[0] != span[0]:
            widest = widest_written = None
        for other in ((widest if span[3] else None), widest_written):
            if other is not None and span[1] < other[2]:
                raise RuntimeError(
                    f"llaca_optim: {span[4]} of {describe(span[5])} shares memory with {other[4]} "
                    f"of {describe(other[5])}, and the step writes "
                    f"{'both' if span[3] and other[3] else 'one'} of them: it would read and write "
                    "one through the other. Give each its own tensor (.clone() the one that was "
                    "assigned from the other)")
        if widest is None or span[2] > widest[2]:
            widest = span
        if span[3] and (widest_written is None or span[2] > widest_written[2]):
            widest_written = span
