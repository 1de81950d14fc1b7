"""Checks a state dict for the wrapper's inner optimizer before it is loaded, whatever that
optimizer calls its state.

NOTE [checking an inner optimizer's state] ``LLaCA`` wraps any torch optimizer, whose state
holds tensors under names we do not know (SGD's ``momentum_buffer``, Adafactor's factored row
and column statistics, an 8-bit optimizer's quantised moments). A loaded tensor of the wrong
shape is accepted by torch's loader and fails in the middle of the next inner step, after some
parameters were already updated and before the LLaCA update: half a step. So before loading, the
state dict is tried on a stand-in: an object of the inner optimizer's class with the same groups
over meta tensors (shapes, no memory, no values), which

1. steps once from no state: the state it makes is the shape every tensor should have; and
2. loads the state dict and steps once from it: the inner optimizer's own code meets the
   loaded tensors there, on meta, where a wrong shape fails with nothing real touched.

A loaded tensor whose shape differs from what step 1 made under the same name, or a step 2 that
fails where step 1 did not, refuses the load, naming the parameter. An optimizer that cannot
step on meta tensors (one that reads values on the host, as transformers' Adafactor does, or
needs a closure) fails step 1: it is then not checked this way; its loaded groups must hold
every option of its ``defaults``, and its state is checked by the names torch's optimizers
share (``SHAPED_STATE_KEYS`` in _core.py) alone.

The stand-in shares the inner optimizer's other attributes (read, not written, by the steps of
torch's optimizers), has no hooks of its own, and is stepped through its class's ``step``, so
that a method patched onto the instance (an LR scheduler's step counter) is not called.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validation as V


def check_inner_state_dict(inner: Optimizer, state_dict: dict[str, Any]) -> None:
    """Raises ``ValueError`` if ``state_dict`` would make ``inner``'s next step fail or use
    state of the wrong shape (NOTE [checking an inner optimizer's state])."""
    try:
        template = _stepped(inner, None)
    except Exception:  # this optimizer cannot step on meta tensors: check its groups' keys
        _check_group_keys(inner, state_dict)
        return
    labels = [V.param_label(group, gi, pi) for gi, group in enumerate(inner.param_groups)
              for pi, _ in enumerate(group["params"])]
    saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    position = {pid: i for i, pid in enumerate(saved_ids)}
    for pid, entry in state_dict["state"].items():
        i = position[pid]
        for key, value in entry.items():
            made = template[i].get(key)
            if (isinstance(value, Tensor) and isinstance(made, Tensor)
                    and value.shape != made.shape):
                raise ValueError(
                    f"llaca_optim: the state dict (inner optimizer) holds {key!r} of shape "
                    f"{tuple(value.shape)} for {labels[i]} (saved id {pid!r}), where "
                    f"{type(inner).__name__} keeps one of shape {tuple(made.shape)}; it was "
                    "saved from another model or its entries were mixed up. Nothing was loaded")
    try:
        _stepped(inner, state_dict)
    except Exception as err:
        culprit = _first_failing_parameter(inner, state_dict, labels)
        raise ValueError(
            f"llaca_optim: the state dict (inner optimizer) cannot be used: "
            f"{type(inner).__name__}'s step from it fails{culprit} with "
            f"{type(err).__name__}: {err}. Load a state dict that this optimizer saved over the "
            "same parameters; nothing was loaded") from err


def _check_group_keys(inner: Optimizer, state_dict: dict[str, Any]) -> None:
    """Every option that each of the optimizer's groups holds now must be in each loaded
    group (a group without ``lr`` would fail at the next step); the LLaCA knobs, which the
    wrapper fills in, may be missing."""
    options = set.intersection(*(set(group) for group in inner.param_groups)) if inner.param_groups else set()
    required = tuple(sorted(options - {"params", *V.LLACA_GROUP_DEFAULTS}))
    for gi, group in enumerate(state_dict["param_groups"]):
        V.check_group_keys(group, required, f"param_groups[{gi}] of the state dict (inner optimizer)",
                           type(inner).__name__)


def _stepped(inner: Optimizer, state_dict: dict[str, Any] | None,
             only: int | None = None) -> list[dict[str, Any]]:
    """The state of a meta stand-in of ``inner`` after loading ``state_dict`` (if any) and one
    step (with gradients on every parameter, or on parameter number ``only``), in parameter
    order."""
    stand_in = _stand_in(inner)
    params = [p for group in stand_in.param_groups for p in group["params"]]
    if state_dict is not None:
        type(inner).load_state_dict(stand_in, _to_meta(state_dict))
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if only is None or i == only else None
    with torch.no_grad():
        type(inner).step(stand_in)
    return [dict(stand_in.state.get(p, {})) for p in params]


def _stand_in(inner: Optimizer) -> Optimizer:
    stand_in = type(inner).__new__(type(inner))
    stand_in.__dict__.update(inner.__dict__)
    for name, value in inner.__dict__.items():
        if name.startswith("_optimizer_") and name.endswith("hooks"):
            setattr(stand_in, name, OrderedDict())
    stand_in.__dict__.pop("step", None)  # patched onto the instance (LR schedulers): not ours
    stand_in.defaults = dict(inner.defaults)  # torch's loader adds to it
    stand_in.state = defaultdict(dict)
    stand_in.param_groups = [
        {**group, "params": [torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                requires_grad=p.requires_grad)
                             for p in group["params"]]}
        for group in inner.param_groups]
    return stand_in


def _to_meta(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every tensor on the meta device (same shapes and dtypes); CPU
    scalars stay (torch's optimizers keep ``step`` on the CPU and read it there)."""
    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value if value.device.type == "cpu" and value.dim() == 0 else value.to("meta")
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return copy.copy(value)
    return {"state": move(state_dict["state"]), "param_groups": move(state_dict["param_groups"])}


def _first_failing_parameter(inner: Optimizer, state_dict: dict[str, Any],
                             labels: list[str]) -> str:
    """`` at <label>`` for the first parameter whose step alone fails, or ``""``."""
    for i, label in enumerate(labels):
        try:
            _stepped(inner, state_dict, only=i)
        except Exception:
            return f" at {label}"
    return ""
