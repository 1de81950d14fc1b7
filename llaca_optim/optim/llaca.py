"""``LLaCA``: the LLaCA EMA after the step of any torch optimizer (SGD, Adam, Adafactor, 8-bit…)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops.registry import Backend
from ..ops.roles import StepHyper
from ..ops.roles import LLACA_UPDATE
from . import validation
from .base import LLaCAOptimizerBase, eager_under_compile
from .inner_check import check_inner_state_dict
from .plan import run_step

__all__ = ["LLaCA"]


class LLaCA(LLaCAOptimizerBase):
    """Wraps ``optimizer``: ``step()`` runs its step, then the LLaCA update of every parameter
    that has a gradient, with the same kernels and task API as :class:`LLaCAAdamW`.

    The wrapper *shares* the inner optimizer's ``param_groups`` (LR schedulers, ``zero_grad`` and
    ``add_param_group`` act on both); the LLaCA knobs (``preset``, ``scale``, ``base_weight``, ``norms``,
    ``horizon``, ``llaca``, ``ema_dtype``, as :class:`LLaCAAdamW` takes them) are stored in those groups, so each group can set its own, and a
    group that already carries one of these keys keeps its value. ``state_dict()`` holds the inner
    optimizer's state dict under ``"inner"`` and the LLaCA state under ``"llaca"``.

    With ``torch.amp.GradScaler`` the scaler unscales the gradients and skips ``step()`` on
    overflow, so a skipped step changes nothing here either. DTensor parameters (FSDP2) are
    handled as in :class:`LLaCAAdamW`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        preset: str = "coin",
        scale: float | None = None,
        base_weight: float | None = None,
        norms: str | None = None,
        horizon: float | None = None,
        llaca: bool = True,
        ema_dtype: Any = None,
        backend: str | Backend = "auto",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"llaca_optim: LLaCA wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        knobs = dict(preset=preset, scale=scale, base_weight=base_weight, norms=norms,
                     horizon=horizon, llaca=llaca, ema_dtype=ema_dtype)
        validation.resolve_llaca_knobs(knobs, "constructor arguments")
        validation.check_each_param_once(optimizer.param_groups)
        for gi, group in enumerate(optimizer.param_groups):  # validate all before changing any
            validation.resolve_llaca_knobs({**knobs, **{k: group[k] for k in knobs if k in group}}, f"param_groups[{gi}]")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Optimizer.__init__ gives us hooks, state and the step patching; the groups it builds are
        # then replaced by the inner optimizer's own list, so both see every change.
        super().__init__(params, {**optimizer.defaults, **knobs})
        self.optimizer = optimizer
        self._link_groups()
        self._setup_backend(backend)

    # The groups are the inner optimizer's, always: read through to its current list, so that
    # whatever replaces that list (its own load_state_dict, DeepSpeed) is seen here too, and
    # what is assigned here goes there. Before the inner optimizer is known (Optimizer.__init__)
    # they are our own.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return inner.param_groups if inner is not None else self.__dict__["param_groups"]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.param_groups = groups
        else:
            self.__dict__["param_groups"] = groups

    def _link_groups(self) -> None:
        self.__dict__.pop("param_groups", None)  # from here on, the inner optimizer's
        self._complete_groups()

    def _complete_groups(self) -> None:
        # A group added through the inner optimizer (inner.add_param_group) after wrapping has
        # none of the LLaCA knobs: it takes the wrapper's, as one added here does.
        for group in self.optimizer.param_groups:
            for key in validation.LLACA_GROUP_DEFAULTS:
                group.setdefault(key, self.defaults[key])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "optimizer"):  # called by Optimizer.__init__ for its temporary group
            super().add_param_group(param_group)
            return

        def add(group: dict[str, Any]) -> None:
            self.optimizer.add_param_group(group)
            for key in validation.LLACA_GROUP_DEFAULTS:
                self.optimizer.param_groups[-1].setdefault(key, self.defaults[key])

        self._add_group_checked(add, param_group)

    def __getstate__(self) -> dict[str, Any]:
        # The inner optimizer travels with us; its param_groups list stays the one we share.
        return {**super().__getstate__(), "optimizer": self.optimizer}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    _op = LLACA_UPDATE

    def _parts(self, group: dict[str, Any]) -> frozenset[str] | None:
        return frozenset({"tensor", *self._llaca_parts(group)}) if group["llaca"] else None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The inner optimizer's step, then the LLaCA update of every parameter with a gradient."""
        self._check_not_swapped("step")
        plan = self._plan_step()  # validate before the inner step changes anything
        if closure is None:
            loss = self.optimizer.step()
        else:  # the closure computes the gradients inside the inner step: plan again after it
            loss = self.optimizer.step(closure)
            plan = self._plan_step()
        self._update(plan)
        return loss

    # The inner step is the inner optimizer's, compiled when the caller compiles it; the LLaCA
    # update is not (NOTE [torch.compile] in base.py).
    @eager_under_compile
    @torch.no_grad()
    def _update(self, plan) -> None:
        run_step([(StepHyper(scale=balance.scale, base_weight=balance.base_weight,
                             mean_norms=balance.mean_norms, horizon=balance.horizon or 0.0), buckets)
                  for _, buckets, balance in plan if buckets],
                 adamw=False, pending=self._pending)
        self._task_steps += 1

    def _step_count(self, p: Tensor) -> Any:
        # The wrapped optimizer's count (Adam's, RMSprop's, Adafactor's...); SGD keeps none.
        count = self.optimizer.state.get(p, {}).get("step")
        return count if isinstance(count, (Tensor, int, float)) else None

    def _reset_for_new_task(self, keep_moments: bool) -> None:
        self.state.clear()
        if not keep_moments:
            self.optimizer.state.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.optimizer.state_dict(), "llaca": super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` saved; checks both parts before changing either."""
        self._check_not_swapped("load a state dict")
        if not isinstance(state_dict, dict) or set(state_dict) != {"inner", "llaca"}:
            raise ValueError(
                "llaca_optim: LLaCA.load_state_dict takes the dict that LLaCA.state_dict() made "
                "(keys 'inner' and 'llaca'); to load only the inner optimizer's state, call "
                "wrapper.optimizer.load_state_dict(...)"
            )
        state_dict = self._copy_state_dict(state_dict)
        self._check_layout(state_dict["inner"], "inner optimizer")
        id_map = self._check_layout(state_dict["llaca"], "LLaCA")
        check_inner_state_dict(self.optimizer, state_dict["inner"])
        with self._restored_on_error(self.optimizer, self):
            groups = self.param_groups
            self.optimizer.load_state_dict(state_dict["inner"])
            self._zero.regroup(groups, self.param_groups)
            super().load_state_dict(state_dict["llaca"])
            self._link_groups()
            live, found = self._settle_loaded(state_dict["llaca"], id_map, "LLaCA", ())
        self._finish_load(live, found, "LLaCA")
