"""Checks a state dict for the wrapper's inner optimizer before it is loaded, whatever that
optimizer calls its state.

NOTE [checking an inner optimizer's state] ``LLaCA`` wraps any torch optimizer, whose state
holds tensors under names we do not know (SGD's ``momentum_buffer``, Adafactor's factored row
and column statistics, an 8-bit optimizer's quantised moments). A loaded tensor of the wrong
shape is accepted by torch's loader and fails in the middle of the next inner step, after some
parameters were already updated and before the LLaCA update: half a step. So before loading, the
state dict is tried on stand-ins: objects of the inner optimizer's class over meta copies of its
parameters (shapes, no memory, no values), which

1. step once from no state: the state they make is the shape each tensor should have; and
2. load the state dict and step once from it: the inner optimizer's own code meets the loaded
   tensors there, on meta, where a wrong shape or dtype fails with nothing real touched.

A loaded tensor whose shape differs from what step 1 made under the same name, or a step 2 that
fails, refuses the load, naming the parameter. Meta tensors have no values, so a meta step of a
parameter depends only on its group, its shape and dtype, and the keys, shapes and dtypes of its
loaded state (and the scalars kept on the CPU, such as step counts): one parameter of each such
kind is stepped, which keeps the check to milliseconds (a meta operation costs tens of
microseconds). An optimizer that cannot step on meta tensors (one that reads values on the
host, as transformers' Adafactor does, or needs a closure) fails step 1: it is then not checked
this way; its loaded groups must hold every option its groups hold now, and its state is checked
by the names torch's optimizers share (``SHAPED_STATE_KEYS`` in base.py) alone.

The stand-ins share the inner optimizer's other attributes (read, not written, by the steps of
torch's optimizers), have no hooks of their own, and are stepped through the class's ``step``, so
that a method patched onto the instance (an LR scheduler's step counter) is not called.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import validation

# (group index, position in the group) of a parameter: its place in both the inner optimizer's
# groups and the state dict's.
Place = tuple[int, int]


def check_inner_state_dict(inner: Optimizer, state_dict: dict[str, Any]) -> None:
    """Raises ``ValueError`` if ``state_dict`` would make ``inner``'s next step fail or use
    state of the wrong shape (NOTE [checking an inner optimizer's state])."""
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    try:
        fresh = _step_kinds(inner, None, lambda place: ())
    except Exception:  # this optimizer cannot step on meta tensors: check its groups' keys
        _check_group_keys(inner, saved_groups)
        return
    label = lambda place: validation.param_label(inner.param_groups[place[0]], *place)  # noqa: E731
    for gi, saved in enumerate(saved_groups):
        for pi, pid in enumerate(saved["params"]):
            for key, value in saved_state.get(pid, {}).items():
                made = fresh[(gi, pi)].get(key)
                if isinstance(value, Tensor) and isinstance(made, Tensor) and value.shape != made.shape:
                    raise ValueError(
                        f"llaca_optim: the state dict (inner optimizer) holds {key!r} of shape "
                        f"{tuple(value.shape)} for {label((gi, pi))} (saved id {pid!r}), where "
                        f"{type(inner).__name__} keeps one of shape {tuple(made.shape)}; it was "
                        "saved from another model or its entries were mixed up. Nothing was loaded")
    kind_of = lambda place: _entry_kind(saved_state.get(saved_groups[place[0]]["params"][place[1]]))  # noqa: E731
    try:
        _step_kinds(inner, state_dict, kind_of)
    except Exception as err:
        where, cause = "", err
        for one in sorted(set(_kinds(inner, kind_of).values())):  # to name the first that fails
            try:
                _step_kinds(inner, state_dict, kind_of, only=one)
            except Exception as alone:
                pid = saved_groups[one[0]]["params"][one[1]]
                where, cause = f" at {label(one)} (saved id {pid!r})", alone
                break
        raise ValueError(
            f"llaca_optim: the state dict (inner optimizer) cannot be used: "
            f"{type(inner).__name__}'s step from it fails{where} with {type(cause).__name__}: "
            f"{cause}. Load a state dict that this optimizer saved over the same parameters; "
            "nothing was loaded") from cause


def _check_group_keys(inner: Optimizer, saved_groups: list[dict[str, Any]]) -> None:
    """Every option that each of the optimizer's groups holds now must be in each loaded
    group (a group without ``lr`` would fail at the next step); the LLaCA knobs, which the
    wrapper fills in, may be missing."""
    options = set.intersection(*(set(g) for g in inner.param_groups)) if inner.param_groups else set()
    required = tuple(sorted(options - {"params", *validation.LLACA_GROUP_DEFAULTS}))
    for gi, group in enumerate(saved_groups):
        validation.check_group_keys(group, required, f"param_groups[{gi}] of the state dict (inner optimizer)",
                           type(inner).__name__)


def _entry_kind(entry: Any) -> tuple[Any, ...]:
    """What of a loaded state entry a meta step can see: its keys, its tensors' shapes and
    dtypes, and the values of what is not moved to meta (numbers, CPU scalars)."""
    if not isinstance(entry, dict):
        return (repr(entry),)
    kind = []
    for key, value in entry.items():
        if isinstance(value, Tensor):
            scalar = value.item() if _stays(value) else None
            kind.append((repr(key), tuple(value.shape), value.dtype, scalar))
        else:
            kind.append((repr(key), type(value).__name__, repr(value)[:64]))
    return tuple(sorted(kind, key=repr))


def _kinds(inner: Optimizer, kind_of: Any) -> dict[Place, Place]:
    """For each parameter's place, the place of the first parameter of its kind in its group."""
    first: dict[tuple[Any, ...], Place] = {}
    out = {}
    for gi, group in enumerate(inner.param_groups):
        for pi, p in enumerate(group["params"]):
            kind = (gi, tuple(p.shape), p.dtype, p.requires_grad, kind_of((gi, pi)))
            out[(gi, pi)] = first.setdefault(kind, (gi, pi))
    return out


def _step_kinds(inner: Optimizer, state_dict: dict[str, Any] | None, kind_of: Any,
                only: Place | None = None) -> dict[Place, dict[str, Any]]:
    """Steps a meta stand-in of ``inner`` holding one parameter of each kind (or the kind of
    ``only``), after loading their part of ``state_dict`` if given; returns the state each
    parameter's kind ended with, by place."""
    representative = _kinds(inner, kind_of)
    chosen = sorted({r for r in representative.values() if only is None or r == only})
    stand_in = _stand_in(inner, [[place for place in chosen if place[0] == gi]
                                 for gi in range(len(inner.param_groups))])
    metas = {place: p for place, p in zip(chosen, (p for g in stand_in.param_groups for p in g["params"]))}
    if state_dict is not None:
        ids = {place: state_dict["param_groups"][place[0]]["params"][place[1]] for place in chosen}
        part = {
            "state": {ids[place]: state_dict["state"][ids[place]] for place in chosen
                      if ids[place] in state_dict["state"]},
            "param_groups": [{**group, "params": [ids[place] for place in chosen if place[0] == gi]}
                             for gi, group in enumerate(state_dict["param_groups"])],
        }
        type(inner).load_state_dict(stand_in, _to_meta(part))
    for p in metas.values():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        type(inner).step(stand_in)
    return {place: stand_in.state.get(metas[r], {}) for place, r in representative.items()
            if r in metas}


def _stand_in(inner: Optimizer, groups: list[list[Place]]) -> Optimizer:
    """An object of ``inner``'s class with ``inner``'s group options over meta copies of the
    parameters at ``groups`` (a list of places per group of ``inner``)."""
    stand_in = type(inner).__new__(type(inner))
    stand_in.__dict__.update(inner.__dict__)
    for name in inner.__dict__:
        if name.startswith("_optimizer_") and name.endswith("hooks"):
            setattr(stand_in, name, OrderedDict())
    stand_in.__dict__.pop("step", None)  # patched onto the instance (LR schedulers): not ours
    stand_in.defaults = dict(inner.defaults)  # torch's loader adds to it
    stand_in.state = defaultdict(dict)
    stand_in.param_groups = []
    for group, places in zip(inner.param_groups, groups):
        params = [group["params"][pi] for _, pi in places]
        stand_in.param_groups.append({**group, "params": [
            torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in params]})
    return stand_in


def _stays(value: Tensor) -> bool:
    """CPU scalars stay where they are: torch's optimizers keep ``step`` on the CPU and read it."""
    return value.device.type == "cpu" and value.dim() == 0


def _to_meta(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every tensor but CPU scalars on the meta device (same shapes and
    dtypes)."""
    def move(value: Any) -> Any:
        if isinstance(value, Tensor):  # a copy either way: the stand-in's step writes it
            return value.clone() if _stays(value) else value.to("meta")
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return copy.copy(value)
    return {"state": move(state_dict["state"]), "param_groups": move(state_dict["param_groups"])}
